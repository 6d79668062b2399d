//! One suite, both stores: every case runs unchanged against SQLite and PostgreSQL. PostgreSQL
//! is required (an unreachable server fails the test); outside CI a developer may opt out with
//! `CARACAL_TEST_SKIP_EXTERNAL=1`, which is refused when `CI=true`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use caracal_crypto::AdminToken;
use caracal_store::db::{Db, Value};
use caracal_store::{
    Application, ApprovalHold, AuditEvent, AuthorityRecord, ConsoleSession, DelegationEdge,
    DeliveryOutcome, IdempotencyReceipt, KekRecord, NewAdminToken, NewZone, NotificationDelivery,
    NotificationSink, OutboxFailure, OutboxMessage, PgOptions, PgStore, PolicyHeader, Provider,
    ProviderConnection, RecordFilter, Resource, SealedSecret, Session, SessionFilter, SigningKey,
    SqliteStore, Store, StoreError, SubjectFilter, SubjectSummary, TokenScope,
};

struct Backend {
    store: Arc<dyn Store>,
    /// The same store as raw SQL, to play an attacker or operator editing rows by hand.
    db: Arc<dyn Db>,
    /// A second handle on the same data, as a second replica would have.
    replica: Arc<dyn Store>,
    schema: Option<String>,
    _directory: Option<tempfile::TempDir>,
}

fn postgres_url() -> String {
    std::env::var("CARACAL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn embedded() -> Backend {
    let directory = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
    Backend {
        store: Arc::new(store.clone()),
        db: Arc::new(store.clone()),
        replica: Arc::new(store),
        schema: None,
        _directory: Some(directory),
    }
}

async fn postgres() -> Option<Backend> {
    let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
    let opted_out = std::env::var("CARACAL_TEST_SKIP_EXTERNAL").is_ok_and(|value| value == "1");
    assert!(
        !(in_ci && opted_out),
        "CARACAL_TEST_SKIP_EXTERNAL is refused when CI=true"
    );
    if opted_out {
        eprintln!("SKIPPED: PostgreSQL case (CARACAL_TEST_SKIP_EXTERNAL=1)");
        return None;
    }
    let schema = format!("test_{}", uuid::Uuid::now_v7().simple());
    let options = PgOptions {
        pool_size: 4,
        schema: Some(schema.clone()),
        ..PgOptions::default()
    };
    let url = postgres_url();
    let connect = || async {
        PgStore::connect(&url, &options)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "PostgreSQL at {url} is required for this test ({error}); start it with \
                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
                )
            })
    };
    let store = connect().await;
    let replica = connect().await;
    Some(Backend {
        store: Arc::new(store.clone()),
        db: Arc::new(store),
        replica: Arc::new(replica),
        schema: Some(schema),
        _directory: None,
    })
}

/// A PostgreSQL session of its own, beside the store's pool, in the test's schema.
async fn session_in(schema: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!("SET search_path TO {schema}"))
        .await
        .unwrap();
    client
}

async fn drop_schema(schema: &str) {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::embedded()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(backend) = super::postgres().await {
                        super::$case(&backend).await;
                        super::drop_schema(backend.schema.as_deref().unwrap()).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    the_read_views_filter_and_page_by_id,
    revoking_a_connection_deletes_its_sealed_tokens,
    admin_objects_are_found_by_kind_and_id_in_any_zone,
    the_deployment_kek_is_recorded_once,
    admin_tokens_are_found_by_digest_only,
    console_sessions_are_shared_refreshed_ended_and_pruned,
    a_zone_and_its_outbox_rows_commit_together,
    outbox_rows_are_claimed_oldest_first_and_never_twice,
    failed_rows_back_off_then_die_at_the_bound,
    dead_rows_are_listed_and_requeued_with_their_evidence,
    a_streams_later_rows_wait_for_its_failed_row,
    a_dead_dispatchers_claims_expire,
    leases_admit_one_holder_at_a_time,
    concurrent_dispatchers_claim_disjoint_rows_in_stream_order,
    no_read_or_update_crosses_zones,
    policy_versions_are_numbered_and_immutable,
    activation_keeps_the_last_known_good,
    every_edge_change_bumps_the_zone_epoch_and_stamps_the_outbox,
    a_session_and_the_edge_it_inherits_commit_together,
    run_time_settings_are_replaced_in_place_with_their_outbox,
    session_leases_are_fenced_and_final_states_stay_final,
    approval_holds_are_decided_once_and_consumed_once,
    idempotency_receipts_conflict_while_live,
    a_delegation_context_is_the_edge_its_sessions_and_the_epoch,
    terminating_a_session_takes_its_subtree_and_edges_in_one_transaction,
    revoking_an_edge_takes_its_descendants_and_their_targets,
    the_subject_kill_switch_takes_records_sessions_and_edges,
    sealed_secrets_version_up_on_replace,
    retention_deletes_only_what_ended_long_enough_ago,
    audit_rows_are_idempotent_on_id_and_ordered_per_zone,
    authority_records_insert_in_batches_and_revoke_once,
    chain_appends_skip_stored_ids_and_stay_contiguous_under_concurrency,
    audit_search_filters_and_pages_newest_first,
    the_dashboard_counts_are_zone_local_and_bounded,
    subjects_are_counted_per_kind_searched_and_paged,
    a_retention_cut_only_moves_forward_and_drops_rows_with_it,
    zones_and_applications_are_renamed_and_archived_in_place,
    providers_and_resources_are_saved_in_place_and_archived_only_when_unused,
    notification_sinks_follow_the_ledger_and_settle_their_deliveries,
    registered_applications_are_capped_per_zone_even_when_they_race,
);

fn message(stream: &str, n: usize) -> OutboxMessage {
    OutboxMessage {
        stream: stream.to_owned(),
        fields: BTreeMap::from([("n".to_owned(), n.to_string())]),
        dedupe_key: Some(format!("key-{n}")),
    }
}

fn zone(n: usize) -> NewZone {
    NewZone {
        id: format!("zone-{n}"),
        name: format!("Zone {n}"),
        slug: format!("zone-{n}"),
    }
}

/// Enqueues `count` messages, one zone each.
async fn enqueue(backend: &Backend, first: usize, count: usize) {
    for n in first..first + count {
        backend
            .store
            .create_zone(&zone(n), &[message("caracal.test", n)])
            .await
            .unwrap();
    }
}

async fn the_deployment_kek_is_recorded_once(backend: &Backend) {
    let store = &backend.store;
    assert_eq!(store.deployment_kek().await.unwrap(), None);
    let record = KekRecord {
        kek_id: "kek_01".into(),
        kek_check: "check".into(),
    };
    store.record_deployment_kek(&record).await.unwrap();
    assert_eq!(
        backend.replica.deployment_kek().await.unwrap(),
        Some(record.clone())
    );
    let second = KekRecord {
        kek_id: "kek_02".into(),
        ..record.clone()
    };
    assert!(matches!(
        store.record_deployment_kek(&second).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.deployment_kek().await.unwrap(), Some(record));
}

async fn console_sessions_are_shared_refreshed_ended_and_pruned(backend: &Backend) {
    let store = &backend.store;
    let session = |id: &str, at: i64| ConsoleSession {
        id_sha256: id.into(),
        token_envelope: format!("sealed-{id}"),
        csrf: format!("csrf-{id}"),
        created_at_ms: at,
        seen_at_ms: at,
    };
    store
        .start_console_session(&session("old", 1_000), 0, 0)
        .await
        .unwrap();
    store
        .start_console_session(&session("idle", 5_000), 0, 0)
        .await
        .unwrap();
    store
        .start_console_session(&session("a", 10_000), 0, 0)
        .await
        .unwrap();
    assert_eq!(
        backend.replica.console_session("a").await.unwrap(),
        Some(session("a", 10_000)),
        "every replica sees a session"
    );
    assert!(matches!(
        store
            .start_console_session(&session("a", 11_000), 0, 0)
            .await,
        Err(StoreError::Conflict(_))
    ));
    store.touch_console_session("a", 12_000).await.unwrap();
    store.touch_console_session("a", 11_000).await.unwrap();
    let seen = store.console_session("a").await.unwrap().unwrap();
    assert_eq!(
        (seen.created_at_ms, seen.seen_at_ms),
        (10_000, 12_000),
        "seen only moves forward"
    );
    // Starting a session prunes those idle since before 6,000 or created before 2,000.
    store
        .start_console_session(&session("b", 13_000), 6_000, 2_000)
        .await
        .unwrap();
    assert_eq!(store.console_session("old").await.unwrap(), None);
    assert_eq!(store.console_session("idle").await.unwrap(), None);
    assert!(store.console_session("a").await.unwrap().is_some());
    store.end_console_session("a").await.unwrap();
    store.end_console_session("a").await.unwrap();
    assert_eq!(store.console_session("a").await.unwrap(), None);
    assert!(store.console_session("b").await.unwrap().is_some());
}

async fn admin_tokens_are_found_by_digest_only(backend: &Backend) {
    let store = &backend.store;
    let token = AdminToken::generate().unwrap();
    let new = NewAdminToken {
        id: "tok_1".into(),
        name: "ci".into(),
        digest: token.digest(),
        scope: TokenScope::Zone("zone-1".into()),
        capabilities: "read".into(),
        created_by: "admin:tok_0".into(),
    };
    assert!(!store.has_active_token_by("admin:tok_0").await.unwrap());
    store.insert_admin_token(&new, &[]).await.unwrap();
    assert!(store.has_active_token_by("admin:tok_0").await.unwrap());
    let found = store
        .find_admin_token(&token.digest())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            found.id.as_str(),
            found.scope,
            found.capabilities.as_str(),
            found.revoked
        ),
        ("tok_1", TokenScope::Zone("zone-1".into()), "read", false)
    );
    let other = AdminToken::generate().unwrap();
    assert_eq!(store.find_admin_token(&other.digest()).await.unwrap(), None);
    let duplicate = NewAdminToken {
        id: "tok_2".into(),
        ..new
    };
    assert!(matches!(
        store.insert_admin_token(&duplicate, &[]).await,
        Err(StoreError::Conflict(_))
    ));
}

async fn a_zone_and_its_outbox_rows_commit_together(backend: &Backend) {
    let store = &backend.store;
    let created = store
        .create_zone(&zone(1), &[message("s", 1), message("s", 2)])
        .await
        .unwrap();
    assert_eq!(
        store.get_zone("zone-1").await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(store.outbox_stats().await.unwrap().pending, 2);

    // A taken slug rolls back the whole transaction, outbox rows included.
    let clash = NewZone {
        id: "zone-9".into(),
        ..zone(1)
    };
    let error = store
        .create_zone(&clash, &[message("s", 3)])
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Conflict(_)), "{error}");
    assert_eq!(store.get_zone("zone-9").await.unwrap(), None);
    assert_eq!(store.outbox_stats().await.unwrap().pending, 2);
    assert_eq!(backend.replica.list_zones().await.unwrap(), [created]);
}

async fn outbox_rows_are_claimed_oldest_first_and_never_twice(backend: &Backend) {
    enqueue(backend, 0, 3).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let lease = Duration::from_secs(30);
    let first = backend.store.claim_outbox("a", 2, lease).await.unwrap();
    let numbers: Vec<&str> = first.iter().map(|row| row.fields["n"].as_str()).collect();
    assert_eq!(numbers, ["0", "1"]);
    assert_eq!(first[0].dedupe_key.as_deref(), Some("key-0"));
    assert_eq!(first[0].stream, "caracal.test");
    // Row 2 is of the same stream: it waits while another dispatcher holds rows 0 and 1, so
    // two dispatchers never interleave one stream.
    for other in [&backend.replica, &backend.store] {
        assert!(other.claim_outbox("b", 10, lease).await.unwrap().is_empty());
    }

    let stats = backend.store.outbox_stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead), (3, 0));
    assert!(stats.oldest_pending_age.unwrap() >= Duration::from_millis(10));
    let ids = |rows: &[caracal_store::OutboxRow]| rows.iter().map(|row| row.id).collect::<Vec<_>>();
    // Only the holder can mark a row, and only the rows it names.
    assert_eq!(
        backend
            .store
            .outbox_published("b", &ids(&first))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        backend
            .store
            .outbox_published("a", &ids(&first[..1]))
            .await
            .unwrap(),
        1
    );
    let stats = backend.store.outbox_stats().await.unwrap();
    assert_eq!(stats.pending, 2, "an unnamed row was marked published");
    assert!(
        backend
            .replica
            .claim_outbox("b", 10, lease)
            .await
            .unwrap()
            .is_empty(),
        "row 1 is still held"
    );
    assert_eq!(
        backend
            .store
            .outbox_published("a", &ids(&first))
            .await
            .unwrap(),
        1
    );
    // The stream's earlier rows are out: the next dispatcher takes row 2, and no one else can.
    let second = backend.replica.claim_outbox("b", 10, lease).await.unwrap();
    assert_eq!(
        second
            .iter()
            .map(|row| row.fields["n"].as_str())
            .collect::<Vec<_>>(),
        ["2"]
    );
    assert!(
        backend
            .store
            .claim_outbox("c", 10, lease)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        backend
            .store
            .outbox_published("b", &ids(&second))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        backend
            .store
            .outbox_published("a", &ids(&first))
            .await
            .unwrap(),
        0
    );
    let stats = backend.store.outbox_stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.dead, stats.oldest_pending_age),
        (0, 0, None)
    );
}

async fn failed_rows_back_off_then_die_at_the_bound(backend: &Backend) {
    enqueue(backend, 0, 1).await;
    let store = &backend.store;
    let lease = Duration::from_secs(30);
    let row = store.claim_outbox("a", 1, lease).await.unwrap().remove(0);
    let outcome = store
        .outbox_failed(row.id, "bus down", Duration::from_millis(150), 2)
        .await
        .unwrap();
    assert_eq!(outcome, OutboxFailure::Retrying);
    assert!(
        store.claim_outbox("a", 1, lease).await.unwrap().is_empty(),
        "backing off"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = store.claim_outbox("a", 1, lease).await.unwrap();
    assert_eq!((again.len(), again[0].attempts), (1, 1));
    let outcome = store
        .outbox_failed(row.id, "bus down", Duration::ZERO, 2)
        .await
        .unwrap();
    assert_eq!(outcome, OutboxFailure::Dead);
    assert!(
        store.claim_outbox("a", 1, lease).await.unwrap().is_empty(),
        "dead rows stay put"
    );
    let stats = store.outbox_stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead), (0, 1));
    // A dead (or unknown) row is not brought back by a late failure report.
    for id in [row.id, i64::MAX] {
        assert!(matches!(
            store.outbox_failed(id, "late", Duration::ZERO, 2).await,
            Err(StoreError::NotFound(_))
        ));
    }
    assert_eq!(store.outbox_stats().await.unwrap().dead, 1);
}

async fn dead_rows_are_listed_and_requeued_with_their_evidence(backend: &Backend) {
    let store = &backend.store;
    for n in 0..3 {
        let stream = format!("caracal.test.{n}");
        store
            .create_zone(&zone(n), &[message(&stream, n)])
            .await
            .unwrap();
    }
    let lease = Duration::from_secs(30);
    let rows = store.claim_outbox("a", 3, lease).await.unwrap();
    assert_eq!(rows.len(), 3, "three streams, one row each");
    for row in &rows[..2] {
        let outcome = store
            .outbox_failed(row.id, "bus down", Duration::ZERO, 1)
            .await
            .unwrap();
        assert_eq!(outcome, OutboxFailure::Dead);
    }
    store.outbox_published("a", &[rows[2].id]).await.unwrap();
    let dead = store.dead_outbox(10).await.unwrap();
    assert_eq!(
        dead.iter()
            .map(|row| (row.id, row.attempts, row.last_error.as_deref()))
            .collect::<Vec<_>>(),
        [
            (rows[0].id, 1, Some("bus down")),
            (rows[1].id, 1, Some("bus down"))
        ]
    );
    assert_eq!(store.dead_outbox(1).await.unwrap().len(), 1);

    // One row back, with the evidence in the same transaction; a published row is not dead.
    let evidence = message("caracal.audit.events", 9);
    for (id, revived) in [(rows[0].id, 1), (rows[2].id, 0), (i64::MAX, 0)] {
        assert_eq!(
            store
                .requeue_dead_outbox(Some(id), std::slice::from_ref(&evidence))
                .await
                .unwrap(),
            revived
        );
    }
    let stats = store.outbox_stats().await.unwrap();
    assert_eq!(
        (stats.dead, stats.pending),
        (1, 4),
        "the revived row and each requeue's evidence"
    );
    let claimed = store.claim_outbox("b", 10, lease).await.unwrap();
    let revived = claimed.iter().find(|row| row.id == rows[0].id).unwrap();
    assert_eq!(revived.attempts, 0, "counted afresh");
    // Then every dead row at once.
    assert_eq!(store.requeue_dead_outbox(None, &[]).await.unwrap(), 1);
    assert_eq!(store.outbox_stats().await.unwrap().dead, 0);
}

/// Each stream keeps its order: while an earlier row of a stream backs off, its later rows are
/// not handed out (other streams' rows are); once it is available again, both go in order.
async fn a_streams_later_rows_wait_for_its_failed_row(backend: &Backend) {
    let store = &backend.store;
    for (n, stream) in [(0, "caracal.s"), (1, "caracal.t"), (2, "caracal.s")] {
        store
            .create_zone(&zone(n), &[message(stream, n)])
            .await
            .unwrap();
    }
    let claimed = store
        .claim_outbox("a", 10, Duration::from_millis(100))
        .await
        .unwrap();
    let ids: Vec<i64> = claimed.iter().map(|row| row.id).collect();
    assert_eq!(ids.len(), 3);
    // The first row of `s` fails; `t` goes out; the dispatcher leaves `s`'s second row alone.
    store
        .outbox_failed(ids[0], "bus down", Duration::from_millis(600), 5)
        .await
        .unwrap();
    assert_eq!(store.outbox_published("a", &[ids[1]]).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        store
            .claim_outbox("b", 10, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty(),
        "`s`'s second row waits for its first"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again: Vec<i64> = store
        .claim_outbox("b", 10, Duration::from_secs(30))
        .await
        .unwrap()
        .iter()
        .map(|row| row.id)
        .collect();
    assert_eq!(again, [ids[0], ids[2]]);
}

async fn a_dead_dispatchers_claims_expire(backend: &Backend) {
    enqueue(backend, 0, 2).await;
    let crashed = backend
        .store
        .claim_outbox("crashed", 10, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(crashed.len(), 2);
    assert!(
        backend
            .replica
            .claim_outbox("b", 10, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rescued = backend
        .replica
        .claim_outbox("b", 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        rescued.iter().map(|row| row.id).collect::<Vec<_>>(),
        crashed.iter().map(|row| row.id).collect::<Vec<_>>()
    );
}

async fn leases_admit_one_holder_at_a_time(backend: &Backend) {
    let (a, b) = (&backend.store, &backend.replica);
    // Long enough that a loaded machine does not let it lapse between the checks.
    let ttl = Duration::from_secs(2);
    assert!(a.try_lease("audit-sweep", "replica-a", ttl).await.unwrap());
    assert!(!b.try_lease("audit-sweep", "replica-b", ttl).await.unwrap());
    assert!(
        a.try_lease("audit-sweep", "replica-a", ttl).await.unwrap(),
        "the holder renews"
    );
    assert!(
        b.try_lease("retention", "replica-b", ttl).await.unwrap(),
        "leases are independent"
    );
    b.release_lease("audit-sweep", "replica-b").await.unwrap();
    assert!(
        !b.try_lease("audit-sweep", "replica-b", ttl).await.unwrap(),
        "only the holder releases"
    );
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert!(
        b.try_lease("audit-sweep", "replica-b", ttl).await.unwrap(),
        "an expired lease moves"
    );
    b.release_lease("audit-sweep", "replica-b").await.unwrap();
    assert!(a.try_lease("audit-sweep", "replica-a", ttl).await.unwrap());
}

/// Four dispatchers on two connections, each claiming, publishing (here: noting the ids) and
/// marking: every row goes out once, and the stream's rows go out in order across them.
async fn concurrent_dispatchers_claim_disjoint_rows_in_stream_order(backend: &Backend) {
    enqueue(backend, 0, 60).await;
    let published = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let store = if worker % 2 == 0 {
                Arc::clone(&backend.store)
            } else {
                Arc::clone(&backend.replica)
            };
            let published = Arc::clone(&published);
            tokio::spawn(async move {
                let name = format!("w{worker}");
                loop {
                    let rows = store
                        .claim_outbox(&name, 7, Duration::from_secs(30))
                        .await
                        .unwrap();
                    if rows.is_empty() {
                        if store.outbox_stats().await.unwrap().pending == 0 {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        continue;
                    }
                    let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
                    published.lock().unwrap().extend(&ids);
                    assert_eq!(
                        store.outbox_published(&name, &ids).await.unwrap(),
                        ids.len() as u64
                    );
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let all = published.lock().unwrap().clone();
    let distinct: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(
        (all.len(), distinct.len()),
        (60, 60),
        "every row published exactly once"
    );
    assert!(
        all.windows(2).all(|pair| pair[0] < pair[1]),
        "one stream's rows went out of order: {all:?}"
    );
}

/// Everything a zone can hold, created in zone `zone`, ids suffixed with `tag`.
async fn populate(store: &dyn Store, zone: &str, tag: &str) {
    let now = caracal_store::now_ms();
    store
        .create_zone(
            &NewZone {
                id: zone.into(),
                name: zone.into(),
                slug: zone.into(),
            },
            &[],
        )
        .await
        .unwrap();
    store
        .create_application(
            &Application {
                id: format!("app-{tag}"),
                zone_id: zone.into(),
                name: "agent".into(),
                client_secret_hash: Some("$argon2id$v=19$m=19456,t=2,p=1$salt$hash".into()),
                traits: vec!["control:read".into()],
                registration_method: "managed".into(),
                expires_at_ms: None,
                created_at_ms: now,
                archived_at_ms: None,
            },
            &[],
        )
        .await
        .unwrap();
    store
        .create_provider(
            &Provider {
                id: format!("prov-{tag}"),
                zone_id: zone.into(),
                name: "api key".into(),
                identifier: "provider://crm".into(),
                kind: "api_key".into(),
                config: r#"{"header":"X-Api-Key"}"#.into(),
                secret_refs: vec![format!("secret-{tag}")],
                created_at_ms: now,
                archived_at_ms: None,
            },
            &[],
        )
        .await
        .unwrap();
    store
        .create_resource(
            &Resource {
                id: format!("res-{tag}"),
                zone_id: zone.into(),
                name: "crm".into(),
                identifier: "resource://crm".into(),
                upstream_url: "http://127.0.0.1:9/crm".into(),
                provider_id: format!("prov-{tag}"),
                scopes: vec!["crm:read".into()],
                operations: r#"[{"method":"GET","path":"/contacts","scope":"crm:read"}]"#.into(),
                operation_enforcement: "enforced".into(),
                created_at_ms: now,
                archived_at_ms: None,
            },
            &[],
        )
        .await
        .unwrap();
    store
        .put_provider_connection(
            &ProviderConnection {
                id: format!("conn-{tag}"),
                zone_id: zone.into(),
                subject_id: "caracal:shared".into(),
                provider_id: format!("prov-{tag}"),
                status: "connected".into(),
                access_token_ref: Some(format!("secret-{tag}")),
                refresh_token_ref: None,
                expires_at_ms: None,
                refreshed_at_ms: None,
                created_at_ms: now,
            },
            &[],
            &[],
        )
        .await
        .unwrap();
    store
        .put_sealed_secret(&sealed(zone, &format!("secret-{tag}"), "envelope-1"), &[])
        .await
        .unwrap();
    store
        .insert_signing_key(
            &SigningKey {
                kid: format!("kid-{tag}"),
                zone_id: zone.into(),
                algorithm: "ES256".into(),
                public_jwk: "{}".into(),
                private_envelope: "sealed".into(),
                kek_id: "kek_01".into(),
                status: "active".into(),
                created_at_ms: now,
                activated_at_ms: Some(now),
                retired_at_ms: None,
            },
            &[],
        )
        .await
        .unwrap();
    store
        .create_policy(&header(zone, &format!("pol-{tag}")), &[])
        .await
        .unwrap();
    let policy_version = store
        .add_policy_version(
            zone,
            &format!("pol-{tag}"),
            &format!("polv-{tag}"),
            "package caracal.authz",
            "sha",
            &[],
        )
        .await
        .unwrap();
    store
        .create_policy_set(&header(zone, &format!("set-{tag}")), &[])
        .await
        .unwrap();
    let manifest = format!(r#"[{{"policy_version_id":"{}"}}]"#, policy_version.id);
    store
        .add_policy_set_version(
            zone,
            &format!("set-{tag}"),
            &format!("setv-{tag}"),
            &manifest,
            "sha",
            &[],
        )
        .await
        .unwrap();
    store
        .activate_policy_set_version(zone, &format!("setv-{tag}"), &[])
        .await
        .unwrap();
    store
        .insert_authority_records(&[authority(zone, &format!("ar-{tag}"))])
        .await
        .unwrap();
    store
        .create_session(
            &session(zone, &format!("s1-{tag}"), &format!("ar-{tag}")),
            &[],
        )
        .await
        .unwrap();
    store
        .create_session(
            &session(zone, &format!("s2-{tag}"), &format!("ar-{tag}")),
            &[],
        )
        .await
        .unwrap();
    store
        .create_delegation_edge(
            &edge(
                zone,
                &format!("edge-{tag}"),
                &format!("s1-{tag}"),
                &format!("s2-{tag}"),
            ),
            &[],
        )
        .await
        .unwrap();
    store
        .create_approval_hold(&hold(zone, &format!("hold-{tag}")), &[])
        .await
        .unwrap();
    store
        .put_idempotency_receipt(&receipt(zone, "key", 60_000))
        .await
        .unwrap();
    store
        .insert_audit_events(&[audit(zone, &format!("ev-{tag}"), 1)])
        .await
        .unwrap();
}

fn sealed(zone: &str, secret_ref: &str, envelope: &str) -> SealedSecret {
    SealedSecret {
        zone_id: zone.into(),
        secret_ref: secret_ref.into(),
        purpose: "provider:api_key".into(),
        kek_id: "kek_01".into(),
        envelope: envelope.into(),
        version: 0,
        updated_at_ms: 0,
    }
}

fn header(zone: &str, id: &str) -> PolicyHeader {
    PolicyHeader {
        id: id.into(),
        zone_id: zone.into(),
        name: id.into(),
        description: String::new(),
        created_at_ms: caracal_store::now_ms(),
        archived_at_ms: None,
    }
}

fn authority(zone: &str, id: &str) -> AuthorityRecord {
    let now = caracal_store::now_ms();
    AuthorityRecord {
        id: id.into(),
        zone_id: zone.into(),
        session_type: "application".into(),
        subject_id: "app-subject".into(),
        parent_id: None,
        status: "active".into(),
        claims: "{}".into(),
        expires_at_ms: now + 600_000,
        authenticated_at_ms: now,
        created_at_ms: now,
        revoked_at_ms: None,
        revoked_reason: None,
    }
}

fn session(zone: &str, id: &str, authority_record_id: &str) -> Session {
    let now = caracal_store::now_ms();
    Session {
        id: id.into(),
        zone_id: zone.into(),
        application_id: "app".into(),
        parent_id: None,
        authority_record_id: authority_record_id.into(),
        status: "active".into(),
        lifecycle: "service".into(),
        depth: 0,
        labels: vec!["team:a".into()],
        metadata: "{}".into(),
        ttl_seconds: None,
        lease_generation: 0,
        heartbeat_deadline_ms: Some(now + 30_000),
        started_at_ms: now,
        last_active_ms: now,
        terminated_at_ms: None,
        termination_reason: None,
    }
}

fn edge(zone: &str, id: &str, source: &str, target: &str) -> DelegationEdge {
    DelegationEdge {
        id: id.into(),
        zone_id: zone.into(),
        source_session_id: source.into(),
        target_session_id: target.into(),
        issuer_application_id: "app".into(),
        receiver_application_id: "app".into(),
        parent_edge_id: None,
        resource_id: Some("resource://crm".into()),
        scopes: vec!["crm:read".into()],
        constraints: r#"{"max_hops":1}"#.into(),
        status: "active".into(),
        expires_at_ms: None,
        created_at_ms: caracal_store::now_ms(),
        revoked_at_ms: None,
    }
}

fn hold(zone: &str, id: &str) -> ApprovalHold {
    let now = caracal_store::now_ms();
    ApprovalHold {
        id: id.into(),
        zone_id: zone.into(),
        session_id: "ar".into(),
        principal_id: "user".into(),
        application_id: "app".into(),
        tier: "high".into(),
        approver_class: "operator".into(),
        binding_hash: "abc".into(),
        metadata: "{}".into(),
        created_at_ms: now,
        expires_at_ms: now + 600_000,
        decision: None,
        decided_at_ms: None,
        decision_reason: None,
        approver_id: None,
        consumed_at_ms: None,
        consumed_record_id: None,
    }
}

fn receipt(zone: &str, key: &str, ttl_ms: i64) -> IdempotencyReceipt {
    IdempotencyReceipt {
        operation: "session.start".into(),
        zone_id: zone.into(),
        scope_id: "app".into(),
        key_digest: key.into(),
        request_digest: "request".into(),
        resource_type: "session".into(),
        resource_id: "s1".into(),
        response_status: 201,
        response_json: r#"{"id":"s1"}"#.into(),
        expires_at_ms: caracal_store::now_ms() + ttl_ms,
    }
}

/// A well-formed hash standing in for a real one (the store checks the form, not the chain).
fn stand_in_hash(text: &str) -> String {
    caracal_crypto::hex(&caracal_crypto::sha256(text.as_bytes()))
}

fn audit(zone: &str, id: &str, seq: i64) -> AuditEvent {
    AuditEvent {
        id: id.into(),
        zone_id: zone.into(),
        event_type: "sts.exchange".into(),
        request_id: "req".into(),
        decision: "allow".into(),
        policy_set_id: None,
        policy_set_version_id: None,
        manifest_sha: None,
        evaluation_status: "ok".into(),
        determining_policies: "[]".into(),
        diagnostics: "[]".into(),
        metadata: "{}".into(),
        occurred_at_ms: seq,
        ingested_at_ms: seq,
        chain_seq: seq,
        content_sha256: stand_in_hash(id),
        prev_content_sha256: stand_in_hash(&format!("before {id}")),
        chain_mac: stand_in_hash("mac"),
        chain_key_id: "chain-key-1".into(),
    }
}

async fn no_read_or_update_crosses_zones(backend: &Backend) {
    let store = backend.store.as_ref();
    populate(store, "zone-a", "a").await;
    store
        .create_zone(
            &NewZone {
                id: "zone-b".into(),
                name: "b".into(),
                slug: "zone-b".into(),
            },
            &[],
        )
        .await
        .unwrap();
    let b = "zone-b";
    // Reads through zone B never see zone A's rows.
    assert_eq!(store.get_application(b, "app-a").await.unwrap(), None);
    assert!(store.list_applications(b).await.unwrap().is_empty());
    assert_eq!(store.get_provider(b, "prov-a").await.unwrap(), None);
    assert!(store.list_providers(b).await.unwrap().is_empty());
    assert_eq!(store.get_resource(b, "res-a").await.unwrap(), None);
    assert_eq!(
        store.find_resource(b, "resource://crm").await.unwrap(),
        None
    );
    assert!(store.list_resources(b).await.unwrap().is_empty());
    assert_eq!(
        store
            .get_provider_connection(b, "caracal:shared", "prov-a")
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.get_sealed_secret(b, "secret-a").await.unwrap(), None);
    assert!(store.list_signing_keys(b).await.unwrap().is_empty());
    assert_eq!(store.get_policy(b, "pol-a").await.unwrap(), None);
    assert!(store.list_policies(b).await.unwrap().is_empty());
    assert_eq!(store.get_policy_version(b, "polv-a").await.unwrap(), None);
    assert!(
        store
            .list_policy_versions(b, "pol-a")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.get_policy_set(b, "set-a").await.unwrap(), None);
    assert!(store.list_policy_sets(b).await.unwrap().is_empty());
    assert_eq!(
        store.get_policy_set_version(b, "setv-a").await.unwrap(),
        None
    );
    assert!(
        store
            .list_policy_set_versions(b, "set-a")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.policy_binding(b).await.unwrap(), None);
    assert_eq!(store.get_authority_record(b, "ar-a").await.unwrap(), None);
    assert!(
        store
            .list_authority_records_of(b, "app-subject")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.get_session(b, "s1-a").await.unwrap(), None);
    assert!(store.list_sessions(b).await.unwrap().is_empty());
    assert!(
        store
            .list_child_sessions(b, "s1-a")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.get_delegation_edge(b, "edge-a").await.unwrap(), None);
    assert!(store.list_edges_from(b, "s1-a").await.unwrap().is_empty());
    assert!(store.list_edges_to(b, "s2-a").await.unwrap().is_empty());
    assert_eq!(store.zone_graph_epoch(b).await.unwrap(), 0);
    assert_eq!(store.get_approval_hold(b, "hold-a").await.unwrap(), None);
    assert!(
        store
            .list_pending_approval_holds(b)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .get_idempotency_receipt("session.start", b, "app", "key")
            .await
            .unwrap(),
        None
    );
    assert!(store.list_audit_events(b, 0, 100).await.unwrap().is_empty());
    assert_eq!(store.audit_head(b).await.unwrap(), None);

    // Updates through zone B cannot reach zone A's rows.
    let not_found = |result: Result<(), StoreError>| matches!(result, Err(StoreError::NotFound(_)));
    assert!(not_found(
        store.set_application_secret(b, "app-a", "x", &[]).await
    ));
    assert!(not_found(store.archive_application(b, "app-a", &[]).await));
    assert!(not_found(
        store
            .set_signing_key_status(b, "kid-a", "retired", &[])
            .await
    ));
    assert!(not_found(
        store.revoke_authority_record(b, "ar-a", "x", &[]).await
    ));
    assert!(not_found(
        store
            .set_session_status(b, "s1-a", "terminated", None, &[])
            .await
    ));
    assert!(matches!(
        store.renew_session_lease(b, "s1-a", 0, 0).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .decide_approval_hold(b, "hold-a", "approved", "", "op", &[])
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.activate_policy_set_version(b, "setv-a", &[]).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .add_policy_version(b, "pol-a", "polv-x", "", "", &[])
            .await,
        Err(StoreError::NotFound(_))
    ));
    let (_, revoked) = store
        .revoke_delegation_edges(b, &["edge-a".into()], &[])
        .await
        .unwrap();
    assert_eq!(revoked, 0);
    let cross_zone_resource = Resource {
        id: "res-x".into(),
        zone_id: b.into(),
        provider_id: "prov-a".into(),
        ..store
            .get_resource("zone-a", "res-a")
            .await
            .unwrap()
            .unwrap()
    };
    assert!(
        not_found(store.create_resource(&cross_zone_resource, &[]).await),
        "a resource cannot bind another zone's provider"
    );

    // Zone A is untouched.
    let app = store
        .get_application("zone-a", "app-a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (app.archived_at_ms, app.traits),
        (None, vec!["control:read".to_owned()])
    );
    assert_eq!(
        store
            .get_session("zone-a", "s1-a")
            .await
            .unwrap()
            .unwrap()
            .status,
        "active"
    );
    assert_eq!(
        store
            .get_delegation_edge("zone-a", "edge-a")
            .await
            .unwrap()
            .unwrap()
            .status,
        "active"
    );
    assert_eq!(
        store
            .get_authority_record("zone-a", "ar-a")
            .await
            .unwrap()
            .unwrap()
            .status,
        "active"
    );
    assert_eq!(
        store
            .get_approval_hold("zone-a", "hold-a")
            .await
            .unwrap()
            .unwrap()
            .decision,
        None
    );
    assert_eq!(
        store.list_signing_keys("zone-a").await.unwrap()[0].status,
        "active"
    );
    assert_eq!(store.zone_graph_epoch("zone-a").await.unwrap(), 1);
}

async fn policy_versions_are_numbered_and_immutable(backend: &Backend) {
    let store = backend.store.as_ref();
    store.create_zone(&zone(1), &[]).await.unwrap();
    store
        .create_policy(&header("zone-1", "pol"), &[])
        .await
        .unwrap();
    let first = store
        .add_policy_version("zone-1", "pol", "v1", "a", "sha-a", &[])
        .await
        .unwrap();
    let second = store
        .add_policy_version("zone-1", "pol", "v2", "b", "sha-b", &[])
        .await
        .unwrap();
    assert_eq!((first.version, second.version), (1, 2));
    assert_eq!(
        store.list_policy_versions("zone-1", "pol").await.unwrap(),
        [first.clone(), second]
    );
    // Neither the API nor a hand-written statement may change a stored version.
    let edit = backend
        .db
        .change(
            "UPDATE policy_versions SET content = 'evil' WHERE id = $1",
            vec![Value::from("v1")],
        )
        .await;
    assert!(edit.is_err(), "{edit:?}");
    let delete = backend
        .db
        .change(
            "DELETE FROM policy_versions WHERE id = $1",
            vec![Value::from("v1")],
        )
        .await;
    assert!(delete.is_err(), "{delete:?}");
    store
        .create_policy_set(&header("zone-1", "set"), &[])
        .await
        .unwrap();
    store
        .add_policy_set_version("zone-1", "set", "sv1", "[]", "sha", &[])
        .await
        .unwrap();
    let edit = backend
        .db
        .change(
            "UPDATE policy_set_versions SET manifest = '[1]' WHERE id = $1",
            vec![Value::from("sv1")],
        )
        .await;
    assert!(edit.is_err(), "{edit:?}");
    assert_eq!(
        store.get_policy_version("zone-1", "v1").await.unwrap(),
        Some(first)
    );
}

async fn activation_keeps_the_last_known_good(backend: &Backend) {
    let store = backend.store.as_ref();
    store.create_zone(&zone(1), &[]).await.unwrap();
    store
        .create_policy_set(&header("zone-1", "set"), &[])
        .await
        .unwrap();
    for id in ["sv1", "sv2"] {
        store
            .add_policy_set_version("zone-1", "set", id, "[]", "sha", &[])
            .await
            .unwrap();
    }
    let invalidate = message("caracal.policy.invalidate", 1);
    let binding = store
        .activate_policy_set_version("zone-1", "sv1", std::slice::from_ref(&invalidate))
        .await
        .unwrap();
    assert_eq!(
        (
            binding.active_version_id.as_str(),
            binding.previous_version_id
        ),
        ("sv1", None)
    );
    let binding = store
        .activate_policy_set_version("zone-1", "sv2", std::slice::from_ref(&invalidate))
        .await
        .unwrap();
    assert_eq!(
        (
            binding.active_version_id.as_str(),
            binding.previous_version_id.as_deref()
        ),
        ("sv2", Some("sv1"))
    );
    let binding = store
        .activate_policy_set_version("zone-1", "sv2", &[])
        .await
        .unwrap();
    assert_eq!(
        binding.previous_version_id.as_deref(),
        Some("sv1"),
        "re-activating keeps the last known good"
    );
    let rolled_back = store
        .activate_policy_set_version("zone-1", "sv1", &[])
        .await
        .unwrap();
    assert_eq!(
        (
            rolled_back.active_version_id.as_str(),
            rolled_back.previous_version_id.as_deref()
        ),
        ("sv1", Some("sv2"))
    );
    assert_eq!(
        store.policy_binding("zone-1").await.unwrap(),
        Some(rolled_back)
    );
    assert_eq!(store.outbox_stats().await.unwrap().pending, 2);
    assert!(matches!(
        store
            .activate_policy_set_version("zone-1", "missing", &[])
            .await,
        Err(StoreError::NotFound(_))
    ));
}

async fn every_edge_change_bumps_the_zone_epoch_and_stamps_the_outbox(backend: &Backend) {
    let store = backend.store.as_ref();
    assert_eq!(store.zone_graph_epoch("zone-1").await.unwrap(), 0);
    let invalidate = OutboxMessage {
        stream: "caracal.delegations.invalidate".into(),
        fields: BTreeMap::from([
            ("zone_id".into(), "zone-1".into()),
            ("event".into(), "edge_create".into()),
        ]),
        dedupe_key: None,
    };
    let epoch = store
        .create_delegation_edge(
            &edge("zone-1", "e1", "s1", "s2"),
            std::slice::from_ref(&invalidate),
        )
        .await
        .unwrap();
    assert_eq!(epoch, 1);
    let epoch = store
        .create_delegation_edge(
            &edge("zone-1", "e2", "s2", "s3"),
            std::slice::from_ref(&invalidate),
        )
        .await
        .unwrap();
    assert_eq!(epoch, 2);
    assert!(
        matches!(
            store
                .create_delegation_edge(
                    &edge("zone-1", "e3", "s3", "s3"),
                    std::slice::from_ref(&invalidate)
                )
                .await,
            Err(StoreError::Query(_))
        ),
        "a self edge is refused and bumps nothing"
    );
    let (epoch, revoked) = store
        .revoke_delegation_edges("zone-1", &["e1".into(), "e2".into()], &[invalidate])
        .await
        .unwrap();
    assert_eq!((epoch, revoked), (3, 2));
    assert_eq!(store.zone_graph_epoch("zone-1").await.unwrap(), 3);
    assert_eq!(
        store.zone_graph_epoch("zone-2").await.unwrap(),
        0,
        "epochs are per zone"
    );
    let rows = store
        .claim_outbox("t", 10, Duration::from_secs(30))
        .await
        .unwrap();
    let epochs: Vec<&str> = rows
        .iter()
        .map(|row| row.fields["epoch"].as_str())
        .collect();
    assert_eq!(epochs, ["1", "2", "3"]);
    let revoked = store
        .get_delegation_edge("zone-1", "e1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.status, "revoked");
    assert!(revoked.revoked_at_ms.is_some());
    assert_eq!(store.list_edges_to("zone-1", "s3").await.unwrap().len(), 1);
    // Several by id in one read: unknown ids and other zones' edges are left out.
    let found: Vec<String> = store
        .get_delegation_edges("zone-1", &["e2", "nope", "e1"])
        .await
        .unwrap()
        .into_iter()
        .map(|edge| edge.id)
        .collect();
    assert_eq!(found, ["e1", "e2"]);
    assert!(
        store
            .get_delegation_edges("zone-2", &["e1", "e2"])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .get_delegation_edges("zone-1", &[])
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_session_and_the_edge_it_inherits_commit_together(backend: &Backend) {
    let store = backend.store.as_ref();
    let invalidate = OutboxMessage {
        stream: "caracal.delegations.invalidate".into(),
        fields: BTreeMap::from([("event".into(), "edge_create".into())]),
        dedupe_key: None,
    };
    store
        .create_session_with_receipt(
            &session("zone-1", "child", "ar"),
            Some(&edge("zone-1", "e-in", "parent", "child")),
            std::slice::from_ref(&invalidate),
            None,
        )
        .await
        .unwrap();
    assert!(
        store
            .get_session("zone-1", "child")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        store.list_edges_to("zone-1", "child").await.unwrap().len(),
        1
    );
    assert_eq!(store.zone_graph_epoch("zone-1").await.unwrap(), 1);
    // An edge that cannot be stored (its id is taken) takes the session with it.
    assert!(
        store
            .create_session_with_receipt(
                &session("zone-1", "other", "ar"),
                Some(&edge("zone-1", "e-in", "parent", "other")),
                std::slice::from_ref(&invalidate),
                None,
            )
            .await
            .is_err()
    );
    assert!(
        store
            .get_session("zone-1", "other")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.zone_graph_epoch("zone-1").await.unwrap(), 1);
    let rows = store
        .claim_outbox("t", 10, Duration::from_secs(30))
        .await
        .unwrap();
    let epochs: Vec<&str> = rows
        .iter()
        .map(|row| row.fields["epoch"].as_str())
        .collect();
    assert_eq!(epochs, ["1"], "one message, stamped with the new epoch");
}

async fn run_time_settings_are_replaced_in_place_with_their_outbox(backend: &Backend) {
    let store = backend.store.as_ref();
    assert_eq!(
        store.get_setting("audit_retention_days").await.unwrap(),
        None
    );
    let setting = |value: &str, by: &str| caracal_store::DeploymentSetting {
        name: "audit_retention_days".into(),
        value: value.into(),
        updated_by: by.into(),
        updated_at_ms: 1000,
    };
    store
        .put_setting(&setting("30", "admin:a"), &[message("s", 1)])
        .await
        .unwrap();
    store
        .put_setting(&setting("7", "admin:b"), &[message("s", 2)])
        .await
        .unwrap();
    assert_eq!(
        store.get_setting("audit_retention_days").await.unwrap(),
        Some(setting("7", "admin:b"))
    );
    let rows = store
        .claim_outbox("t", 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "each change with its outbox row");
}

async fn session_leases_are_fenced_and_final_states_stay_final(backend: &Backend) {
    let store = backend.store.as_ref();
    store
        .create_session(&session("zone-1", "s1", "ar"), &[])
        .await
        .unwrap();
    let mut child = session("zone-1", "s2", "ar");
    child.parent_id = Some("s1".into());
    child.depth = 1;
    store.create_session(&child, &[]).await.unwrap();
    assert_eq!(
        store.list_child_sessions("zone-1", "s1").await.unwrap(),
        [child]
    );
    assert_eq!(
        store
            .renew_session_lease("zone-1", "s1", 0, 1)
            .await
            .unwrap(),
        1
    );
    assert!(
        matches!(
            store.renew_session_lease("zone-1", "s1", 0, 1).await,
            Err(StoreError::Conflict(_))
        ),
        "a stale holder is fenced off"
    );
    assert_eq!(
        store
            .renew_session_lease("zone-1", "s1", 1, 2)
            .await
            .unwrap(),
        2
    );
    store
        .set_session_status("zone-1", "s1", "suspended", None, &[])
        .await
        .unwrap();
    assert!(matches!(
        store.renew_session_lease("zone-1", "s1", 2, 3).await,
        Err(StoreError::Conflict(_))
    ));
    store
        .set_session_status("zone-1", "s1", "active", None, &[])
        .await
        .unwrap();
    store
        .set_session_status(
            "zone-1",
            "s1",
            "terminated",
            Some("operator"),
            &[message("caracal.sessions.revoke", 1)],
        )
        .await
        .unwrap();
    let ended = store.get_session("zone-1", "s1").await.unwrap().unwrap();
    assert_eq!(
        (ended.status.as_str(), ended.termination_reason.as_deref()),
        ("terminated", Some("operator"))
    );
    assert!(ended.terminated_at_ms.is_some());
    assert!(
        matches!(
            store
                .set_session_status("zone-1", "s1", "active", None, &[])
                .await,
            Err(StoreError::NotFound(_))
        ),
        "terminated is final"
    );
    assert_eq!(store.outbox_stats().await.unwrap().pending, 1);
}

async fn approval_holds_are_decided_once_and_consumed_once(backend: &Backend) {
    let store = backend.store.as_ref();
    store
        .create_approval_hold(&hold("zone-1", "h1"), &[])
        .await
        .unwrap();
    let mut expired = hold("zone-1", "h2");
    expired.expires_at_ms = caracal_store::now_ms() - 1;
    store.create_approval_hold(&expired, &[]).await.unwrap();
    let pending: Vec<String> = store
        .list_pending_approval_holds("zone-1")
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.id)
        .collect();
    assert_eq!(pending, ["h1"]);
    assert!(
        matches!(
            store
                .consume_approval_hold("zone-1", "h1", &authority("zone-1", "ar-h1"), &[])
                .await,
            Err(StoreError::Conflict(_))
        ),
        "undecided holds cannot be used"
    );
    store
        .decide_approval_hold("zone-1", "h1", "approved", "looks right", "operator-1", &[])
        .await
        .unwrap();
    assert!(matches!(
        store
            .decide_approval_hold("zone-1", "h1", "rejected", "", "operator-2", &[])
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(
        matches!(
            store
                .decide_approval_hold("zone-1", "h2", "approved", "", "operator-1", &[])
                .await,
            Err(StoreError::Conflict(_))
        ),
        "expired holds cannot be decided"
    );
    store
        .consume_approval_hold("zone-1", "h1", &authority("zone-1", "ar-h1"), &[])
        .await
        .unwrap();
    assert!(
        store
            .get_authority_record("zone-1", "ar-h1")
            .await
            .unwrap()
            .is_some(),
        "the consuming mint's record is created with the consumption"
    );
    assert!(
        matches!(
            store
                .consume_approval_hold("zone-1", "h1", &authority("zone-1", "ar-h1"), &[])
                .await,
            Err(StoreError::Conflict(_))
        ),
        "single use"
    );
    let decided = store
        .get_approval_hold("zone-1", "h1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (decided.decision.as_deref(), decided.approver_id.as_deref()),
        (Some("approved"), Some("operator-1"))
    );
    assert_eq!(decided.consumed_record_id.as_deref(), Some("ar-h1"));
}

async fn a_delegation_context_is_the_edge_its_sessions_and_the_epoch(backend: &Backend) {
    let store = backend.store.as_ref();
    store
        .create_session(&session("zone-1", "s-1", "ar-1"), &[])
        .await
        .unwrap();
    store
        .create_session(&session("zone-1", "s-2", "ar-2"), &[])
        .await
        .unwrap();
    store
        .create_delegation_edge(&edge("zone-1", "e-1", "s-1", "s-2"), &[])
        .await
        .unwrap();
    // The target session is missing for this one.
    store
        .create_delegation_edge(&edge("zone-1", "e-2", "s-1", "s-gone"), &[])
        .await
        .unwrap();
    let context = store
        .delegation_context("zone-1", "e-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        context.edge,
        store
            .get_delegation_edge("zone-1", "e-1")
            .await
            .unwrap()
            .unwrap()
    );
    assert_eq!(
        context.source,
        store.get_session("zone-1", "s-1").await.unwrap()
    );
    assert_eq!(
        context.target,
        store.get_session("zone-1", "s-2").await.unwrap()
    );
    assert_eq!(context.epoch, 2);
    let partial = store
        .delegation_context("zone-1", "e-2")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((partial.source.is_some(), partial.target), (true, None));
    assert_eq!(
        store.delegation_context("zone-2", "e-1").await.unwrap(),
        None,
        "zone-scoped"
    );
    assert_eq!(
        store.delegation_context("zone-1", "nope").await.unwrap(),
        None
    );

    // Read again after each change, the context shows it (the embedded store remembers it
    // between changes and must forget it at each one).
    let (epoch, revoked) = store
        .revoke_delegation_edges("zone-1", &["e-1".to_owned()], &[])
        .await
        .unwrap();
    assert_eq!(revoked, 1);
    let context = store
        .delegation_context("zone-1", "e-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (context.edge.status.as_str(), context.epoch),
        ("revoked", epoch)
    );
    store
        .terminate_session_tree("zone-1", "s-2", "done", termination_messages)
        .await
        .unwrap();
    let context = store
        .delegation_context("zone-1", "e-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        context.target.map(|target| target.status),
        Some("terminated".to_owned())
    );
}

fn termination_messages(tree: &caracal_store::TerminatedTree) -> Vec<OutboxMessage> {
    tree.sessions
        .iter()
        .map(|(id, _)| message("caracal.sessions.revoke", id.len()))
        .collect()
}

async fn terminating_a_session_takes_its_subtree_and_edges_in_one_transaction(backend: &Backend) {
    let store = backend.store.as_ref();
    for (id, parent) in [
        ("root", None),
        ("child", Some("root")),
        ("grandchild", Some("child")),
        ("other", None),
    ] {
        let mut session = session("zone-1", id, "ar");
        session.parent_id = parent.map(str::to_owned);
        store.create_session(&session, &[]).await.unwrap();
    }
    // An edge into the subtree from outside, one out of it, and one elsewhere.
    store
        .create_delegation_edge(&edge("zone-1", "e-in", "other", "child"), &[])
        .await
        .unwrap();
    store
        .create_delegation_edge(&edge("zone-1", "e-out", "grandchild", "other"), &[])
        .await
        .unwrap();
    let (unrelated_a, unrelated_b) = ("x-1", "x-2");
    store
        .create_session(&session("zone-1", unrelated_a, "ar"), &[])
        .await
        .unwrap();
    store
        .create_session(&session("zone-1", unrelated_b, "ar"), &[])
        .await
        .unwrap();
    store
        .create_delegation_edge(&edge("zone-1", "e-else", unrelated_a, unrelated_b), &[])
        .await
        .unwrap();

    let tree = store
        .terminate_session_tree("zone-1", "root", "done", termination_messages)
        .await
        .unwrap();
    let mut sessions: Vec<&str> = tree.sessions.iter().map(|(id, _)| id.as_str()).collect();
    sessions.sort_unstable();
    assert_eq!(sessions, ["child", "grandchild", "root"]);
    let mut edges: Vec<&str> = tree.edges.iter().map(|(id, _)| id.as_str()).collect();
    edges.sort_unstable();
    assert_eq!(edges, ["e-in", "e-out"]);
    assert_eq!((tree.zone_id.as_str(), tree.epoch), ("zone-1", 4));
    assert_eq!(
        store
            .get_session("zone-1", "other")
            .await
            .unwrap()
            .unwrap()
            .status,
        "active"
    );
    assert_eq!(
        store
            .get_delegation_edge("zone-1", "e-else")
            .await
            .unwrap()
            .unwrap()
            .status,
        "active"
    );
    assert_eq!(
        store
            .get_session("zone-1", "grandchild")
            .await
            .unwrap()
            .unwrap()
            .status,
        "terminated"
    );
    let queued = store
        .claim_outbox("w", 100, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let revokes = queued
        .iter()
        .filter(|row| row.stream == "caracal.sessions.revoke")
        .count();
    assert_eq!(
        revokes, 3,
        "the messages built from the result, in the same transaction"
    );
    assert!(
        queued
            .iter()
            .all(|row| row.fields.get("epoch").map(String::as_str) != Some(""))
    );
    // Again: nothing left to change; another zone or an unknown session is not found.
    let again = store
        .terminate_session_tree("zone-1", "root", "done", termination_messages)
        .await
        .unwrap();
    assert!(again.sessions.is_empty() && again.edges.is_empty());
    assert!(matches!(
        store
            .terminate_session_tree("zone-2", "root", "x", termination_messages)
            .await,
        Err(StoreError::NotFound(_))
    ));
}

async fn revoking_an_edge_takes_its_descendants_and_their_targets(backend: &Backend) {
    let store = backend.store.as_ref();
    for (id, parent) in [
        ("a", None),
        ("b", None),
        ("c", None),
        ("c-child", Some("c")),
        ("d", None),
    ] {
        let mut session = session("zone-1", id, "ar");
        session.parent_id = parent.map(str::to_owned);
        store.create_session(&session, &[]).await.unwrap();
    }
    // a → b (e-1), b → c (e-2, child of e-1), and an unrelated a → d (e-3).
    store
        .create_delegation_edge(&edge("zone-1", "e-1", "a", "b"), &[])
        .await
        .unwrap();
    let mut second = edge("zone-1", "e-2", "b", "c");
    second.parent_edge_id = Some("e-1".into());
    store.create_delegation_edge(&second, &[]).await.unwrap();
    store
        .create_delegation_edge(&edge("zone-1", "e-3", "a", "d"), &[])
        .await
        .unwrap();
    let tree = store
        .revoke_delegation_tree("zone-1", "e-1", "revoked", termination_messages)
        .await
        .unwrap();
    let mut sessions: Vec<&str> = tree.sessions.iter().map(|(id, _)| id.as_str()).collect();
    sessions.sort_unstable();
    assert_eq!(sessions, ["b", "c", "c-child"]);
    let mut edges: Vec<&str> = tree.edges.iter().map(|(id, _)| id.as_str()).collect();
    edges.sort_unstable();
    assert_eq!(edges, ["e-1", "e-2"]);
    assert_eq!(
        store
            .get_session("zone-1", "a")
            .await
            .unwrap()
            .unwrap()
            .status,
        "active"
    );
    assert_eq!(
        store
            .get_delegation_edge("zone-1", "e-3")
            .await
            .unwrap()
            .unwrap()
            .status,
        "active"
    );
    assert!(matches!(
        store
            .revoke_delegation_tree("zone-1", "nope", "x", termination_messages)
            .await,
        Err(StoreError::NotFound(_))
    ));
}

async fn the_subject_kill_switch_takes_records_sessions_and_edges(backend: &Backend) {
    let store = backend.store.as_ref();
    let mut record = authority("zone-1", "ar-subject");
    record.subject_id = "user-7".into();
    store.insert_authority_records(&[record]).await.unwrap();
    let mut bound = session("zone-1", "bound", "ar-subject");
    bound.parent_id = None;
    store.create_session(&bound, &[]).await.unwrap();
    let mut below = session("zone-1", "below", "ar-other");
    below.parent_id = Some("bound".into());
    store.create_session(&below, &[]).await.unwrap();
    store
        .create_session(&session("zone-1", "elsewhere", "ar-other"), &[])
        .await
        .unwrap();
    store
        .create_delegation_edge(&edge("zone-1", "e-k", "elsewhere", "bound"), &[])
        .await
        .unwrap();
    let tree = store
        .revoke_subject("zone-1", "user-7", "subject_revoked", termination_messages)
        .await
        .unwrap();
    assert_eq!(tree.records, ["ar-subject"]);
    let mut sessions: Vec<&str> = tree.sessions.iter().map(|(id, _)| id.as_str()).collect();
    sessions.sort_unstable();
    assert_eq!(sessions, ["below", "bound"]);
    assert_eq!(tree.edges.len(), 1);
    let revoked = store
        .get_authority_record("zone-1", "ar-subject")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.status, "revoked");
    assert_eq!(
        store
            .get_session("zone-1", "elsewhere")
            .await
            .unwrap()
            .unwrap()
            .status,
        "active"
    );
    let again = store
        .revoke_subject("zone-1", "user-7", "subject_revoked", termination_messages)
        .await
        .unwrap();
    assert!(again.records.is_empty() && again.sessions.is_empty());
}

async fn idempotency_receipts_conflict_while_live(backend: &Backend) {
    let store = backend.store.as_ref();
    store
        .put_idempotency_receipt(&receipt("zone-1", "k1", 60_000))
        .await
        .unwrap();
    assert!(matches!(
        store
            .put_idempotency_receipt(&receipt("zone-1", "k1", 60_000))
            .await,
        Err(StoreError::Conflict(_))
    ));
    let found = store
        .get_idempotency_receipt("session.start", "zone-1", "app", "k1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.response_status, found.response_json.as_str()),
        (201, r#"{"id":"s1"}"#)
    );
    store
        .put_idempotency_receipt(&receipt("zone-1", "k2", -1))
        .await
        .unwrap();
    assert_eq!(
        store
            .get_idempotency_receipt("session.start", "zone-1", "app", "k2")
            .await
            .unwrap(),
        None,
        "expired receipts are not replayed"
    );
    store
        .put_idempotency_receipt(&receipt("zone-1", "k2", 60_000))
        .await
        .unwrap();
    assert_eq!(store.purge_idempotency_receipts().await.unwrap(), 0);
}

async fn sealed_secrets_version_up_on_replace(backend: &Backend) {
    let store = backend.store.as_ref();
    assert_eq!(
        store
            .put_sealed_secret(&sealed("zone-1", "s", "one"), &[])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .put_sealed_secret(
                &sealed("zone-1", "s", "two"),
                &[message("caracal.keys.invalidate", 1)]
            )
            .await
            .unwrap(),
        2
    );
    let secret = store
        .get_sealed_secret("zone-1", "s")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            secret.envelope.as_str(),
            secret.version,
            secret.kek_id.as_str()
        ),
        ("two", 2, "kek_01")
    );
    assert_eq!(store.outbox_stats().await.unwrap().pending, 1);
}

async fn audit_rows_are_idempotent_on_id_and_ordered_per_zone(backend: &Backend) {
    let store = backend.store.as_ref();
    let batch = [
        audit("zone-1", "e1", 1),
        audit("zone-1", "e2", 2),
        audit("zone-2", "e3", 1),
    ];
    assert_eq!(store.insert_audit_events(&batch).await.unwrap(), 3);
    assert_eq!(
        store.insert_audit_events(&batch[..2]).await.unwrap(),
        0,
        "redelivered events are skipped"
    );
    let clash = audit("zone-1", "e9", 2);
    assert!(
        matches!(
            store.insert_audit_events(&[clash]).await,
            Err(StoreError::Conflict(_))
        ),
        "one row per chain position"
    );
    let listed: Vec<String> = store
        .list_audit_events("zone-1", 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(listed, ["e1", "e2"]);
    assert_eq!(
        store.list_audit_events("zone-1", 1, 10).await.unwrap()[0].id,
        "e2"
    );
    assert_eq!(
        store.audit_head("zone-1").await.unwrap(),
        Some((2, stand_in_hash("e2"))),
        "hashes are stored as bytes and read back as the same hex"
    );
    assert_eq!(
        store.audit_head("zone-2").await.unwrap(),
        Some((1, stand_in_hash("e3")))
    );
    let mut malformed = audit("zone-2", "e4", 2);
    malformed.chain_mac = "AB".repeat(32);
    assert!(
        matches!(
            store.insert_audit_events(&[malformed]).await,
            Err(StoreError::Query(_))
        ),
        "a hash is stored only from its one accepted spelling"
    );
    assert_eq!(
        store
            .list_audit_events("zone-2", 0, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn authority_records_insert_in_batches_and_revoke_once(backend: &Backend) {
    let store = backend.store.as_ref();
    let batch: Vec<AuthorityRecord> = (0..50)
        .map(|n| authority("zone-1", &format!("ar-{n}")))
        .collect();
    store.insert_authority_records(&batch).await.unwrap();
    assert_eq!(
        store
            .list_authority_records_of("zone-1", "app-subject")
            .await
            .unwrap()
            .len(),
        50
    );
    let duplicate = vec![authority("zone-1", "ar-new"), authority("zone-1", "ar-0")];
    assert!(matches!(
        store.insert_authority_records(&duplicate).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store
            .get_authority_record("zone-1", "ar-new")
            .await
            .unwrap(),
        None,
        "a failed batch writes nothing"
    );
    store
        .revoke_authority_record("zone-1", "ar-1", "kill switch", &[])
        .await
        .unwrap();
    assert!(matches!(
        store
            .revoke_authority_record("zone-1", "ar-1", "again", &[])
            .await,
        Err(StoreError::NotFound(_))
    ));
    let revoked = store
        .get_authority_record("zone-1", "ar-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (revoked.status.as_str(), revoked.revoked_reason.as_deref()),
        ("revoked", Some("kill switch"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_a_schema_from_a_newer_release_and_changes_nothing() {
    let Some(backend) = postgres().await else {
        return;
    };
    let schema = backend.schema.clone().unwrap();
    backend
        .db
        .change(
            "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES (999, 'future', 0)",
            vec![],
        )
        .await
        .unwrap();
    let options = PgOptions {
        pool_size: 1,
        schema: Some(schema.clone()),
        ..PgOptions::default()
    };
    let error = PgStore::connect(&postgres_url(), &options)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            error,
            StoreError::SchemaTooNew {
                found: 999,
                supported: 22
            }
        ),
        "{error}"
    );
    let rows = backend
        .db
        .rows(
            "SELECT version FROM schema_migrations ORDER BY version",
            vec![],
        )
        .await
        .unwrap();
    let versions: Vec<i64> = rows.iter().map(|row| row.int(0).unwrap()).collect();
    assert_eq!(
        versions,
        [
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 999
        ],
        "the refused start wrote nothing"
    );
    drop_schema(&schema).await;
}

/// A builder that links `ids` after the head (hashes are stand-ins; the store does not check).
fn link_after(zone: &'static str, ids: Vec<String>) -> caracal_store::ChainBuilder {
    Box::new(move |head, existing| {
        let (mut seq, mut previous) = head.unwrap_or((0, "00".repeat(32)));
        let mut rows = Vec::new();
        for id in ids.into_iter().filter(|id| !existing.contains(id)) {
            seq += 1;
            let mut row = audit(zone, &id, seq);
            row.prev_content_sha256 = previous.clone();
            previous = row.content_sha256.clone();
            rows.push(row);
        }
        Ok(rows)
    })
}

async fn chain_appends_skip_stored_ids_and_stay_contiguous_under_concurrency(backend: &Backend) {
    let ids = |range: std::ops::Range<usize>| range.map(|n| format!("ev-{n}")).collect::<Vec<_>>();
    let store = &backend.store;
    assert_eq!(
        store
            .append_audit_chain("zone-1", &ids(0..3), link_after("zone-1", ids(0..3)))
            .await
            .unwrap(),
        3
    );
    // A redelivered batch overlapping what is stored appends only the new events.
    assert_eq!(
        store
            .append_audit_chain("zone-1", &ids(2..5), link_after("zone-1", ids(2..5)))
            .await
            .unwrap(),
        2
    );
    let rows = store.audit_range("zone-1", 1, 100).await.unwrap();
    let sequence: Vec<(i64, String)> = rows
        .iter()
        .map(|row| (row.chain_seq, row.id.clone()))
        .collect();
    assert_eq!(
        sequence,
        (1..=5)
            .map(|n| (n as i64, format!("ev-{}", n - 1)))
            .collect::<Vec<_>>()
    );
    assert_eq!(rows[1].prev_content_sha256, rows[0].content_sha256);

    // Two replicas appending to one zone at once never collide or leave a gap.
    let appenders: Vec<_> = [Arc::clone(&backend.store), Arc::clone(&backend.replica)]
        .into_iter()
        .enumerate()
        .map(|(replica, store)| {
            tokio::spawn(async move {
                for batch in 0..10 {
                    let ids: Vec<String> =
                        (0..5).map(|n| format!("r{replica}-b{batch}-{n}")).collect();
                    loop {
                        match store
                            .append_audit_chain("zone-2", &ids, link_after("zone-2", ids.clone()))
                            .await
                        {
                            Ok(_) => break,
                            // SQLite's single writer can be busy; PostgreSQL's lock serialises.
                            Err(StoreError::Unavailable(_) | StoreError::Conflict(_)) => {
                                tokio::task::yield_now().await
                            }
                            Err(error) => panic!("{error}"),
                        }
                    }
                }
            })
        })
        .collect();
    for appender in appenders {
        appender.await.unwrap();
    }
    let rows = store.audit_range("zone-2", 1, 1000).await.unwrap();
    let sequence: Vec<i64> = rows.iter().map(|row| row.chain_seq).collect();
    assert_eq!(sequence, (1..=100).collect::<Vec<i64>>());
    assert_eq!(store.audit_zones().await.unwrap(), ["zone-1", "zone-2"]);
}

async fn audit_search_filters_and_pages_newest_first(backend: &Backend) {
    let store = &backend.store;
    let mut rows = Vec::new();
    for seq in 1..=12 {
        let mut row = audit("zone-1", &format!("e{seq}"), seq);
        row.occurred_at_ms = 1000 + seq;
        row.decision = if seq % 3 == 0 {
            "deny".into()
        } else {
            "allow".into()
        };
        row.event_type = if seq % 2 == 0 {
            "gateway.request".into()
        } else {
            "sts.exchange".into()
        };
        row.request_id = format!("req-{}", seq / 2);
        row.metadata = format!(
            r#"{{"agent_session_id":"s{}","application_id":"app-{}","delegation_edge_id":"edge-{}","session_id":"ar-{}"}}"#,
            seq % 4,
            seq % 2,
            seq % 5,
            seq % 3,
        );
        rows.push(row);
    }
    store.insert_audit_events(&rows).await.unwrap();
    store
        .insert_audit_events(&[audit("zone-2", "other", 1)])
        .await
        .unwrap();
    let ids = |found: Vec<caracal_store::AuditEvent>| {
        found.into_iter().map(|row| row.id).collect::<Vec<_>>()
    };
    let search = |filter: caracal_store::AuditFilter, before: Option<i64>, limit: i64| {
        let store = Arc::clone(store);
        async move {
            ids(store
                .search_audit("zone-1", &filter, before, limit)
                .await
                .unwrap())
        }
    };
    use caracal_store::AuditFilter as F;
    assert_eq!(search(F::default(), None, 3).await, ["e12", "e11", "e10"]);
    assert_eq!(
        search(F::default(), Some(10), 2).await,
        ["e9", "e8"],
        "the cursor pages on"
    );
    assert_eq!(
        search(
            F {
                decision: Some("deny".into()),
                ..F::default()
            },
            None,
            100
        )
        .await,
        ["e12", "e9", "e6", "e3"]
    );
    assert_eq!(
        search(
            F {
                since_ms: Some(1010),
                ..F::default()
            },
            None,
            100
        )
        .await,
        ["e12", "e11", "e10"]
    );
    assert_eq!(
        search(
            F {
                until_ms: Some(1003),
                ..F::default()
            },
            None,
            100
        )
        .await,
        ["e2", "e1"]
    );
    assert_eq!(
        search(
            F {
                request_id: Some("req-3".into()),
                ..F::default()
            },
            None,
            100
        )
        .await,
        ["e7", "e6"]
    );
    assert_eq!(
        search(
            F {
                event_types: vec!["gateway.request".into()],
                decision: Some("deny".into()),
                ..F::default()
            },
            None,
            100
        )
        .await,
        ["e12", "e6"]
    );
    assert_eq!(
        search(
            F {
                event_types: vec!["gateway.request".into(), "sts.exchange".into()],
                until_ms: Some(1004),
                ..F::default()
            },
            None,
            100
        )
        .await,
        ["e3", "e2", "e1"],
        "any of several types"
    );
    assert_eq!(
        search(
            F {
                event_types: vec!["nope".into()],
                ..F::default()
            },
            None,
            100
        )
        .await,
        Vec::<String>::new()
    );
    assert_eq!(
        search(
            F {
                application_id: Some("app-1".into()),
                authority_record_id: Some("ar-0".into()),
                ..F::default()
            },
            None,
            100
        )
        .await,
        ["e9", "e3"],
        "by the application and the authority record in the metadata"
    );
    assert_eq!(
        search(
            F {
                session_id: Some("s1".into()),
                ..F::default()
            },
            None,
            100
        )
        .await,
        ["e9", "e5", "e1"]
    );
    assert_eq!(
        search(
            F {
                edge_id: Some("edge-0".into()),
                ..F::default()
            },
            None,
            100
        )
        .await,
        ["e10", "e5"]
    );
    assert_eq!(
        search(
            F {
                session_id: Some("s\"".into()),
                ..F::default()
            },
            None,
            100
        )
        .await,
        Vec::<String>::new()
    );
    assert_eq!(
        ids(store
            .search_audit("zone-2", &F::default(), None, 100)
            .await
            .unwrap()),
        ["other"]
    );
}

async fn the_dashboard_counts_are_zone_local_and_bounded(backend: &Backend) {
    let store = backend.store.as_ref();
    let now = caracal_store::now_ms();
    let mut records = Vec::new();
    for (id, status, expires_at_ms) in [
        ("live-1", "active", now + 60_000),
        ("live-2", "active", now + 60_000),
        ("lapsed", "active", now - 1),
        ("gone", "revoked", now + 60_000),
    ] {
        let mut record = authority("zone-1", id);
        (record.status, record.expires_at_ms) = (status.into(), expires_at_ms);
        records.push(record);
    }
    records.push(authority("zone-2", "theirs"));
    store.insert_authority_records(&records).await.unwrap();
    assert_eq!(
        store
            .count_active_authority_records("zone-1", now)
            .await
            .unwrap(),
        2
    );

    // Six events: the first two before the window, then allow, deny, allow, partial.
    let decisions = ["allow", "deny", "allow", "deny", "allow", "partial"];
    let rows: Vec<AuditEvent> = (1..=6)
        .map(|seq| {
            let mut row = audit("zone-1", &format!("d{seq}"), seq);
            row.occurred_at_ms = if seq <= 2 { 100 } else { 1000 + seq };
            row.decision = decisions[seq as usize - 1].into();
            row
        })
        .collect();
    store.insert_audit_events(&rows).await.unwrap();
    store
        .insert_audit_events(&[audit("zone-2", "other", 1)])
        .await
        .unwrap();
    let counted = |scan: i64| async move {
        let found = store.recent_decisions("zone-1", 1000, scan).await.unwrap();
        (
            found
                .counts
                .iter()
                .map(|(decision, count)| format!("{decision}={count}"))
                .collect::<Vec<_>>()
                .join(","),
            found.complete,
        )
    };
    assert_eq!(
        counted(100).await,
        ("allow=2,deny=1,partial=1".into(), true)
    );
    assert_eq!(counted(5).await, ("allow=2,deny=1,partial=1".into(), true));
    assert_eq!(
        counted(3).await,
        ("allow=1,deny=1,partial=1".into(), false),
        "a scan that ends inside the window says so"
    );
    let empty = store.recent_decisions("zone-9", 0, 10).await.unwrap();
    assert!(empty.counts.is_empty() && empty.complete);
}

async fn subjects_are_counted_per_kind_searched_and_paged(backend: &Backend) {
    let store = backend.store.as_ref();
    let now = caracal_store::now_ms();
    let mut records = Vec::new();
    for (n, (subject, kind, status, expires_at_ms)) in [
        ("alice", "user", "active", now + 60_000),
        ("alice", "user", "active", now - 1),
        ("alice", "user", "revoked", now + 60_000),
        ("alice", "application", "active", now + 60_000),
        ("a_b%c", "user", "expired", now - 1),
        ("axbyc", "user", "active", now + 60_000),
        ("bob", "user", "active", now + 60_000),
    ]
    .into_iter()
    .enumerate()
    {
        let mut record = authority("zone-1", &format!("ar-{n}"));
        record.subject_id = subject.into();
        record.session_type = kind.into();
        (record.status, record.expires_at_ms) = (status.into(), expires_at_ms);
        record.created_at_ms = 1000 + n as i64;
        records.push(record);
    }
    let mut foreign = authority("zone-2", "theirs");
    foreign.subject_id = "alice".into();
    records.push(foreign);
    store.insert_authority_records(&records).await.unwrap();
    let page = |filter: SubjectFilter, limit: i64| async move {
        store
            .page_subjects("zone-1", &filter, now, limit)
            .await
            .unwrap()
            .into_iter()
            .map(|row| format!("{}/{}", row.subject_id, row.kind))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        page(SubjectFilter::default(), 10).await,
        [
            "a_b%c/user",
            "alice/application",
            "alice/user",
            "axbyc/user",
            "bob/user"
        ]
    );
    let alice = store
        .page_subjects(
            "zone-1",
            &SubjectFilter {
                subject_id: Some("alice".into()),
                kind: Some("user".into()),
                ..SubjectFilter::default()
            },
            now,
            10,
        )
        .await
        .unwrap();
    assert_eq!(
        alice,
        [SubjectSummary {
            subject_id: "alice".into(),
            kind: "user".into(),
            active: 1,
            revoked: 1,
            expired: 1,
            first_seen_ms: 1000,
            last_seen_ms: 1002,
        }]
    );
    // Pages resume after (subject, kind), so one subject's two kinds may straddle pages.
    let first = page(SubjectFilter::default(), 3).await;
    assert_eq!(first, ["a_b%c/user", "alice/application", "alice/user"]);
    let after = Some(("alice".to_owned(), "application".to_owned()));
    assert_eq!(
        page(
            SubjectFilter {
                after,
                ..SubjectFilter::default()
            },
            3
        )
        .await,
        ["alice/user", "axbyc/user", "bob/user"]
    );
    // A search is a case-insensitive substring; `_` and `%` are themselves, not wildcards.
    let search = |text: &str| SubjectFilter {
        search: Some(text.into()),
        ..SubjectFilter::default()
    };
    assert_eq!(page(search("b%"), 10).await, ["a_b%c/user"]);
    assert_eq!(page(search("a_b"), 10).await, ["a_b%c/user"]);
    assert_eq!(page(search("BO"), 10).await, ["bob/user"]);
    assert_eq!(
        page(
            SubjectFilter {
                kind: Some("application".into()),
                ..SubjectFilter::default()
            },
            10
        )
        .await,
        ["alice/application"]
    );
}

async fn a_retention_cut_only_moves_forward_and_drops_rows_with_it(backend: &Backend) {
    let ids = (0..6).map(|n| format!("ev-{n}")).collect::<Vec<_>>();
    let store = &backend.store;
    store
        .append_audit_chain("zone-1", &ids, link_after("zone-1", ids.clone()))
        .await
        .unwrap();
    let others = (0..6).map(|n| format!("other-{n}")).collect::<Vec<_>>();
    store
        .append_audit_chain("zone-2", &others, link_after("zone-2", others.clone()))
        .await
        .unwrap();
    assert_eq!(store.audit_cut("zone-1").await.unwrap(), None);
    let cut = |seq: i64| caracal_store::AuditCut {
        zone_id: "zone-1".into(),
        cut_seq: seq,
        last_content_sha256: format!("hash-{seq}"),
        frontier: String::new(),
        cut_at_ms: seq,
        chain_key_id: "chain-1".into(),
        cut_mac: format!("mac-{seq}"),
    };
    assert_eq!(store.cut_audit_chain(&cut(3)).await.unwrap(), 3);
    assert_eq!(store.audit_cut("zone-1").await.unwrap(), Some(cut(3)));
    // An older cut neither replaces the record nor brings rows back.
    assert_eq!(store.cut_audit_chain(&cut(2)).await.unwrap(), 0);
    assert_eq!(store.audit_cut("zone-1").await.unwrap(), Some(cut(3)));
    assert_eq!(store.cut_audit_chain(&cut(5)).await.unwrap(), 2);
    assert_eq!(store.audit_cut("zone-1").await.unwrap(), Some(cut(5)));
    let left: Vec<i64> = store
        .audit_range("zone-1", 1, 100)
        .await
        .unwrap()
        .iter()
        .map(|row| row.chain_seq)
        .collect();
    assert_eq!(left, [6]);
    assert_eq!(
        store.audit_range("zone-2", 1, 100).await.unwrap().len(),
        6,
        "other zones keep theirs"
    );
    assert_eq!(store.audit_cut("zone-2").await.unwrap(), None);
}

/// Rows an earlier release wrote with hex hash columns, as raw SQL would have left them: one
/// genuine, one with a column rewritten into something that is not hex.
const EARLIER_ROWS: &str = "INSERT INTO audit_events (id, zone_id, event_type, request_id, decision,
     evaluation_status, determining_policies, diagnostics, metadata, occurred_at_ms, ingested_at_ms,
     chain_seq, content_sha256, prev_content_sha256, chain_mac, chain_key_id)
     VALUES ($1, 'zone-1', 't', 'r', 'allow', 'complete', '[]', '[]', '{}', 1, 1, $2, $3, $4, $5, 'chain-1')";

async fn write_earlier_rows(db: &dyn Db) {
    let hex = stand_in_hash("old");
    for (id, seq, mac) in [
        ("old-1", 1_i64, hex.clone()),
        ("old-2", 2, "tampered".to_owned()),
    ] {
        db.change(
            EARLIER_ROWS,
            vec![
                id.into(),
                seq.into(),
                hex.clone().into(),
                hex.clone().into(),
                mac.into(),
            ],
        )
        .await
        .unwrap();
    }
}

async fn check_upgraded_rows(store: &dyn Store) {
    let rows = store.audit_range("zone-1", 1, 2).await.unwrap();
    let hex = stand_in_hash("old");
    assert_eq!(
        (rows[0].content_sha256.as_str(), rows[0].chain_mac.as_str()),
        (hex.as_str(), hex.as_str()),
        "hex becomes bytes and reads back unchanged"
    );
    // Not hex: kept as its bytes, so the sweep still sees a MAC that does not verify.
    assert_eq!(rows[1].chain_mac, caracal_crypto::hex(b"tampered"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_hex_hashes_of_an_earlier_release_become_bytes() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("store.db");
    let store = SqliteStore::open(&path).unwrap();
    // SQLite keeps text written into a BLOB column as text: what version 5 held.
    write_earlier_rows(&store).await;
    store
        .change("DELETE FROM schema_migrations WHERE version >= 6", vec![])
        .await
        .unwrap();
    // Migrations 7 and 8 run again too: undo what they added.
    store
        .change("DROP INDEX applications_live_name", vec![])
        .await
        .unwrap();
    store
        .change("DROP INDEX outbox_dedupe", vec![])
        .await
        .unwrap();
    store
        .change("DROP TABLE policy_loads", vec![])
        .await
        .unwrap();
    store
        .change(
            "ALTER TABLE approval_holds DROP COLUMN consumed_record_id",
            vec![],
        )
        .await
        .unwrap();
    store
        .change("DROP INDEX delegation_edges_parent", vec![])
        .await
        .unwrap();
    for undo in LATER_MIGRATIONS {
        store.change(undo, vec![]).await.unwrap();
    }
    store
        .change("ALTER TABLE zones DROP COLUMN archived_at_ms", vec![])
        .await
        .unwrap();
    drop(store);
    check_upgraded_rows(&SqliteStore::open(&path).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hex_hashes_of_an_earlier_release_become_bytes() {
    let Some(backend) = postgres().await else {
        return;
    };
    let schema = backend.schema.clone().unwrap();
    backend
        .db
        .change(
            "ALTER TABLE audit_events
                 ALTER COLUMN content_sha256 TYPE TEXT USING encode(content_sha256, 'hex'),
                 ALTER COLUMN prev_content_sha256 TYPE TEXT USING encode(prev_content_sha256, 'hex'),
                 ALTER COLUMN chain_mac TYPE TEXT USING encode(chain_mac, 'hex')",
            vec![],
        )
        .await
        .unwrap();
    write_earlier_rows(backend.db.as_ref()).await;
    backend
        .db
        .change("DELETE FROM schema_migrations WHERE version >= 6", vec![])
        .await
        .unwrap();
    for undo in [
        "DROP INDEX applications_live_name",
        "DROP INDEX outbox_dedupe",
        "DROP TABLE policy_loads",
        "ALTER TABLE approval_holds DROP COLUMN consumed_record_id",
        "DROP INDEX delegation_edges_parent",
        "ALTER TABLE zones DROP COLUMN archived_at_ms",
    ]
    .into_iter()
    .chain(LATER_MIGRATIONS)
    {
        backend.db.change(undo, vec![]).await.unwrap();
    }
    let options = PgOptions {
        pool_size: 1,
        schema: Some(schema.clone()),
        ..PgOptions::default()
    };
    let upgraded = PgStore::connect(&postgres_url(), &options).await.unwrap();
    check_upgraded_rows(&upgraded).await;
    drop_schema(&schema).await;
}

async fn zones_and_applications_are_renamed_and_archived_in_place(backend: &Backend) {
    let store = backend.store.as_ref();
    let change =
        |name: &str, traits: &[&str], hash: Option<&str>| caracal_store::ApplicationChange {
            name: name.into(),
            traits: traits.iter().map(|t| t.to_string()).collect(),
            client_secret_hash: hash.map(str::to_owned),
        };
    store.create_zone(&zone(1), &[]).await.unwrap();
    store.create_zone(&zone(2), &[]).await.unwrap();
    let renamed = store
        .update_zone("zone-1", "Payments", "payments", false, None, &[])
        .await
        .unwrap();
    assert_eq!(
        (renamed.name.as_str(), renamed.slug.as_str()),
        ("Payments", "payments")
    );
    assert!(matches!(
        store
            .update_zone("zone-2", "x", "payments", false, None, &[])
            .await,
        Err(StoreError::Conflict(_))
    ));
    let app = |id: &str, name: &str| Application {
        id: id.into(),
        zone_id: "zone-1".into(),
        name: name.into(),
        client_secret_hash: None,
        traits: vec![],
        registration_method: "managed".into(),
        expires_at_ms: None,
        created_at_ms: 1,
        archived_at_ms: None,
    };
    store
        .create_application(&app("app-1", "Billing"), &[])
        .await
        .unwrap();
    assert!(
        matches!(
            store
                .create_application(&app("app-2", "billing"), &[])
                .await,
            Err(StoreError::Conflict(_))
        ),
        "live names are unique per zone regardless of case"
    );
    store
        .create_application(&app("app-2", "Ledger"), &[])
        .await
        .unwrap();
    assert!(matches!(
        store
            .update_application("zone-1", "app-2", &change("BILLING", &[], None), &[])
            .await,
        Err(StoreError::Conflict(_))
    ));
    store
        .update_application(
            "zone-1",
            "app-2",
            &change("Ledger", &["tier:gold"], Some("$argon2id$new")),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .get_application("zone-1", "app-2")
            .await
            .unwrap()
            .unwrap()
            .traits,
        ["tier:gold"]
    );
    assert!(matches!(
        store
            .update_application("zone-2", "app-2", &change("Other", &[], None), &[])
            .await,
        Err(StoreError::NotFound(_))
    ));
    store
        .archive_application("zone-1", "app-1", &[])
        .await
        .unwrap();
    store
        .create_application(&app("app-3", "billing"), &[])
        .await
        .unwrap();
    store.archive_zone("zone-1", &[]).await.unwrap();
    assert!(
        store
            .get_zone("zone-1")
            .await
            .unwrap()
            .unwrap()
            .archived_at_ms
            .is_some()
    );
    assert!(matches!(
        store.archive_zone("zone-1", &[]).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .update_zone("zone-1", "again", "again", false, None, &[])
            .await,
        Err(StoreError::NotFound(_))
    ));
}

async fn providers_and_resources_are_saved_in_place_and_archived_only_when_unused(
    backend: &Backend,
) {
    let store = backend.store.as_ref();
    store.create_zone(&zone(1), &[]).await.unwrap();
    store.create_zone(&zone(2), &[]).await.unwrap();
    let provider = |id: &str, zone: &str, identifier: &str| Provider {
        id: id.into(),
        zone_id: zone.into(),
        name: id.into(),
        identifier: identifier.into(),
        kind: "api_key".into(),
        config: "{}".into(),
        secret_refs: vec![format!("provider/{id}/api_key")],
        created_at_ms: 1,
        archived_at_ms: None,
    };
    let sealed = |zone: &str, reference: &str, envelope: &str| SealedSecret {
        zone_id: zone.into(),
        secret_ref: reference.into(),
        purpose: "provider-secret".into(),
        kek_id: "kek".into(),
        envelope: envelope.into(),
        version: 0,
        updated_at_ms: 0,
    };
    let p1 = provider("p1", "zone-1", "provider://one");
    store
        .save_provider(
            &p1,
            &[sealed("zone-1", "provider/p1/api_key", "env-1")],
            &[],
        )
        .await
        .unwrap();
    let mut renamed = p1.clone();
    renamed.config = r#"{"header":"x-api-key"}"#.into();
    store
        .save_provider(
            &renamed,
            &[sealed("zone-1", "provider/p1/api_key", "env-2")],
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .get_provider("zone-1", "p1")
            .await
            .unwrap()
            .unwrap()
            .config,
        renamed.config
    );
    let secret = store
        .get_sealed_secret("zone-1", "provider/p1/api_key")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((secret.envelope.as_str(), secret.version), ("env-2", 2));
    assert!(matches!(
        store
            .save_provider(&provider("p2", "zone-1", "provider://one"), &[], &[])
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(
        matches!(
            store
                .save_provider(&provider("p1", "zone-2", "provider://x"), &[], &[])
                .await,
            Err(StoreError::NotFound(_))
        ),
        "another zone cannot take over a provider by id"
    );

    let resource = |id: &str, zone: &str, provider_id: &str, identifier: &str| Resource {
        id: id.into(),
        zone_id: zone.into(),
        name: id.into(),
        identifier: identifier.into(),
        upstream_url: "http://127.0.0.1:9".into(),
        provider_id: provider_id.into(),
        scopes: vec!["crm:read".into()],
        operations: "[]".into(),
        operation_enforcement: "enforced".into(),
        created_at_ms: 1,
        archived_at_ms: None,
    };
    let r1 = resource("r1", "zone-1", "p1", "resource://crm");
    store.save_resource(&r1, &[]).await.unwrap();
    let mut wider = r1.clone();
    wider.scopes.push("crm:write".into());
    store.save_resource(&wider, &[]).await.unwrap();
    assert_eq!(
        store
            .get_resource("zone-1", "r1")
            .await
            .unwrap()
            .unwrap()
            .scopes,
        wider.scopes
    );
    assert!(matches!(
        store
            .save_resource(&resource("r2", "zone-1", "p1", "resource://crm"), &[])
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(
        matches!(
            store
                .save_resource(&resource("r3", "zone-2", "p1", "resource://x"), &[])
                .await,
            Err(StoreError::NotFound(_))
        ),
        "a resource binds only a provider of its own zone"
    );
    assert!(matches!(
        store.archive_provider("zone-1", "p1", &[]).await,
        Err(StoreError::Conflict(_))
    ));
    store.archive_resource("zone-1", "r1", &[]).await.unwrap();
    store.archive_provider("zone-1", "p1", &[]).await.unwrap();
    assert!(matches!(
        store
            .save_resource(&resource("r4", "zone-1", "p1", "resource://new"), &[])
            .await,
        Err(StoreError::NotFound(_))
    ));
}

async fn retention_deletes_only_what_ended_long_enough_ago(backend: &Backend) {
    let store = backend.store.as_ref();
    let now = caracal_store::now_ms();
    let day = 24 * 3600 * 1000;
    // Records: one long expired and unbound, one long expired but bound to a live session,
    // one current.
    let mut old = authority("zone-1", "ar-old");
    old.expires_at_ms = now - 40 * day;
    let mut bound = authority("zone-1", "ar-bound");
    bound.expires_at_ms = now - 40 * day;
    store
        .insert_authority_records(&[old, bound, authority("zone-1", "ar-now")])
        .await
        .unwrap();
    for (id, record) in [
        ("s-old", "ar-now"),
        ("s-live", "ar-bound"),
        ("s-recent", "ar-now"),
    ] {
        store
            .create_session(&session("zone-1", id, record), &[])
            .await
            .unwrap();
    }
    store
        .create_delegation_edge(&edge("zone-1", "e-old", "s-old", "s-recent"), &[])
        .await
        .unwrap();
    store
        .create_delegation_edge(&edge("zone-1", "e-live", "s-live", "s-recent"), &[])
        .await
        .unwrap();
    store
        .terminate_session_tree("zone-1", "s-old", "done", |_| Vec::new())
        .await
        .unwrap();
    store
        .terminate_session_tree("zone-1", "s-recent", "done", |_| Vec::new())
        .await
        .unwrap();
    // Nothing ended before the cut yet.
    assert_eq!(
        store
            .purge_ended_runtime(now - 30 * day, 100)
            .await
            .unwrap(),
        1,
        "only ar-old"
    );
    // With the cut after everything that ended: the ended sessions and revoked edges go, the
    // live session, its edge-free record and the current record stay.
    let later = caracal_store::now_ms() + 1;
    assert_eq!(store.purge_ended_runtime(later, 100).await.unwrap(), 4);
    assert!(
        store
            .get_session("zone-1", "s-old")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .get_session("zone-1", "s-recent")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .get_session("zone-1", "s-live")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .get_delegation_edge("zone-1", "e-old")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .get_delegation_edge("zone-1", "e-live")
            .await
            .unwrap()
            .is_none(),
        "revoked with its target"
    );
    assert!(
        store
            .get_authority_record("zone-1", "ar-bound")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .get_authority_record("zone-1", "ar-now")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(store.purge_ended_runtime(later, 100).await.unwrap(), 0);
}

/// Undoes the migrations after 11 (runtime retention indexes, containment; 18 only dropped an
/// index of 12, and 19's index goes with its table).
const LATER_MIGRATIONS: [&str; 13] = [
    "DROP INDEX authority_records_status_expiry",
    "DROP INDEX sessions_status_ended",
    "DROP INDEX sessions_authority_record",
    "DROP INDEX delegation_edges_status_revoked",
    "DROP TABLE containment",
    "DROP TABLE admin_objects",
    "DROP TABLE console_users",
    "DROP TABLE console_sessions",
    "DROP TABLE replay_memory",
    "DROP TABLE deployment_settings",
    "DROP TABLE notification_sinks",
    "DROP TABLE notification_deliveries",
    "ALTER TABLE zones DROP COLUMN dcr_enabled",
];

async fn the_read_views_filter_and_page_by_id(backend: &Backend) {
    let store = backend.store.as_ref();
    let mut user = authority("zone-1", "ar-2");
    user.session_type = "user".into();
    user.subject_id = "alice".into();
    let records = [
        authority("zone-1", "ar-1"),
        user,
        authority("zone-2", "ar-3"),
    ];
    store.insert_authority_records(&records).await.unwrap();
    for (id, record, labels, status) in [
        ("s-1", "ar-1", vec!["team:a"], "active"),
        ("s-2", "ar-2", vec!["team:b", "x\"y"], "active"),
        ("s-3", "ar-1", vec!["team:b"], "suspended"),
    ] {
        let mut created = session("zone-1", id, record);
        created.labels = labels.into_iter().map(str::to_owned).collect();
        created.status = status.into();
        store.create_session(&created, &[]).await.unwrap();
    }
    store
        .create_session(&session("zone-2", "s-4", "ar-3"), &[])
        .await
        .unwrap();
    let ids = |rows: Vec<String>| rows;
    let record_ids = |filter: RecordFilter, after: Option<&'static str>, limit: i64| async move {
        ids(store
            .page_authority_records("zone-1", &filter, after, limit)
            .await
            .unwrap()
            .into_iter()
            .map(|record| record.id)
            .collect())
    };
    assert_eq!(
        record_ids(RecordFilter::default(), None, 10).await,
        ["ar-1", "ar-2"]
    );
    assert_eq!(
        record_ids(RecordFilter::default(), Some("ar-1"), 10).await,
        ["ar-2"]
    );
    assert_eq!(record_ids(RecordFilter::default(), None, 1).await, ["ar-1"]);
    let users = RecordFilter {
        kind: Some("user".into()),
        ..RecordFilter::default()
    };
    assert_eq!(record_ids(users, None, 10).await, ["ar-2"]);
    let alice = RecordFilter {
        subject_id: Some("alice".into()),
        status: Some("active".into()),
        ..RecordFilter::default()
    };
    assert_eq!(record_ids(alice, None, 10).await, ["ar-2"]);

    let session_ids = |filter: SessionFilter, after: Option<&'static str>| async move {
        ids(store
            .page_sessions("zone-1", &filter, after, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|session| session.id)
            .collect())
    };
    assert_eq!(
        session_ids(SessionFilter::default(), None).await,
        ["s-1", "s-2", "s-3"]
    );
    assert_eq!(
        session_ids(SessionFilter::default(), Some("s-2")).await,
        ["s-3"]
    );
    let team_b = SessionFilter {
        label: Some("team:b".into()),
        ..SessionFilter::default()
    };
    assert_eq!(session_ids(team_b, None).await, ["s-2", "s-3"]);
    // A label is matched whole, quotes included, never as a fragment.
    let quoted = SessionFilter {
        label: Some("x\"y".into()),
        ..SessionFilter::default()
    };
    assert_eq!(session_ids(quoted, None).await, ["s-2"]);
    let fragment = SessionFilter {
        label: Some("team".into()),
        ..SessionFilter::default()
    };
    assert!(session_ids(fragment, None).await.is_empty());
    let of_alice = SessionFilter {
        subject_id: Some("alice".into()),
        ..SessionFilter::default()
    };
    assert_eq!(session_ids(of_alice, None).await, ["s-2"]);
    let suspended = SessionFilter {
        status: Some("suspended".into()),
        lifecycle: Some("service".into()),
        ..SessionFilter::default()
    };
    assert_eq!(session_ids(suspended, None).await, ["s-3"]);
}

async fn revoking_a_connection_deletes_its_sealed_tokens(backend: &Backend) {
    let store = backend.store.as_ref();
    populate(store, "zone-c", "c").await;
    let connection = ProviderConnection {
        id: "conn-alice".into(),
        zone_id: "zone-c".into(),
        subject_id: "alice".into(),
        provider_id: "prov-c".into(),
        status: "connected".into(),
        access_token_ref: Some("connection/conn-alice/access_token".into()),
        refresh_token_ref: Some("connection/conn-alice/refresh_token".into()),
        expires_at_ms: None,
        refreshed_at_ms: None,
        created_at_ms: caracal_store::now_ms(),
    };
    let secrets = [
        sealed("zone-c", "connection/conn-alice/access_token", "a"),
        sealed("zone-c", "connection/conn-alice/refresh_token", "r"),
    ];
    store
        .put_provider_connection(&connection, &secrets, &[])
        .await
        .unwrap();
    // A provider of another zone is not this zone's: nothing is written.
    let foreign = ProviderConnection {
        provider_id: "prov-elsewhere".into(),
        ..connection.clone()
    };
    assert!(matches!(
        store.put_provider_connection(&foreign, &[], &[]).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store
            .list_provider_connections("zone-c")
            .await
            .unwrap()
            .len(),
        2
    );
    // A refresh lands only on the connection as its refresher read it.
    let refreshed = ProviderConnection {
        expires_at_ms: Some(9_000),
        refreshed_at_ms: Some(5_000),
        ..connection.clone()
    };
    let fresh = [sealed("zone-c", "connection/conn-alice/access_token", "a2")];
    store
        .refresh_provider_connection(&refreshed, None, &fresh)
        .await
        .unwrap();
    let late = [sealed("zone-c", "connection/conn-alice/access_token", "a3")];
    assert!(matches!(
        store
            .refresh_provider_connection(&refreshed, None, &late)
            .await,
        Err(StoreError::Conflict(_))
    ));
    let stored = store
        .get_sealed_secret("zone-c", "connection/conn-alice/access_token")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.envelope, fresh[0].envelope,
        "the lost race wrote nothing"
    );
    assert_eq!(
        store
            .get_provider_connection("zone-c", "alice", "prov-c")
            .await
            .unwrap()
            .unwrap()
            .expires_at_ms,
        Some(9_000)
    );
    store
        .revoke_provider_connection("zone-c", "alice", "prov-c", &[])
        .await
        .unwrap();
    let revoked = store
        .get_provider_connection("zone-c", "alice", "prov-c")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.status, "revoked");
    assert_eq!(revoked.access_token_ref, None);
    for secret in &secrets {
        assert!(
            store
                .get_sealed_secret("zone-c", &secret.secret_ref)
                .await
                .unwrap()
                .is_none(),
            "{} is deleted",
            secret.secret_ref
        );
    }
    // The provider's own secret is untouched.
    assert!(
        store
            .get_sealed_secret("zone-c", "secret-c")
            .await
            .unwrap()
            .is_some()
    );
    assert!(matches!(
        store
            .revoke_provider_connection("zone-c", "bob", "prov-c", &[])
            .await,
        Err(StoreError::NotFound(_))
    ));
}

async fn admin_objects_are_found_by_kind_and_id_in_any_zone(backend: &Backend) {
    let store = backend.store.as_ref();
    populate(store, "zone-w", "w").await;
    let object = caracal_store::AdminObject {
        zone_id: "zone-w".into(),
        kind: "workload".into(),
        id: "wl-1".into(),
        unique_key: Some("launcher".into()),
        status: "active".into(),
        body: "{}".into(),
        created_at_ms: 1,
        updated_at_ms: 1,
    };
    store.insert_admin_object(&object, None, &[]).await.unwrap();
    let found = store.find_admin_object("workload", "wl-1").await.unwrap();
    assert_eq!(found.map(|found| found.zone_id), Some("zone-w".to_owned()));
    // Another kind with the same id, or an unknown id, is not it.
    assert!(
        store
            .find_admin_object("grant", "wl-1")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .find_admin_object("workload", "wl-2")
            .await
            .unwrap()
            .is_none()
    );
}

fn sink(zone: &str, id: &str) -> NotificationSink {
    NotificationSink {
        id: id.into(),
        zone_id: zone.into(),
        name: format!("sink {id}"),
        url: "https://hooks.example/approvals".into(),
        sealed_secret: "sealed".into(),
        event_types: r#"["step_up_issued"]"#.into(),
        active: true,
        cursor_seq: -1,
        consecutive_failures: 0,
        last_success_at_ms: None,
        last_failure_at_ms: None,
        last_error: None,
        created_at_ms: 1_000,
        updated_at_ms: 1_000,
    }
}

fn delivery(sink: &str, event: &str, created_at_ms: i64) -> NotificationDelivery {
    NotificationDelivery {
        id: format!("{sink}-{event}"),
        sink_id: sink.into(),
        zone_id: "zone-0".into(),
        event_id: event.into(),
        event_type: "step_up_issued".into(),
        payload: "{}".into(),
        attempts: 0,
        available_at_ms: created_at_ms,
        delivered_at_ms: None,
        abandoned_at_ms: None,
        response_status: None,
        last_error: None,
        created_at_ms,
    }
}

async fn notification_sinks_follow_the_ledger_and_settle_their_deliveries(backend: &Backend) {
    let store = backend.store.as_ref();
    for n in 0..2 {
        store.create_zone(&zone(n), &[]).await.unwrap();
    }
    let mut events = vec![audit("zone-0", "e1", 1), audit("zone-0", "e2", 2)];
    events[1].event_type = "step_up_issued".into();
    store.insert_audit_events(&events).await.unwrap();

    // A new sink starts at its zone's ledger head; the zone holds at most `max` sinks.
    store
        .insert_notification_sink(&sink("zone-0", "s1"), 2, &[message("caracal.test", 1)])
        .await
        .unwrap();
    store
        .insert_notification_sink(&sink("zone-1", "s9"), 2, &[])
        .await
        .unwrap();
    store
        .insert_notification_sink(&sink("zone-0", "s2"), 2, &[])
        .await
        .unwrap();
    assert!(matches!(
        store
            .insert_notification_sink(&sink("zone-0", "s3"), 2, &[])
            .await,
        Err(StoreError::LimitReached(_))
    ));
    let first = store
        .get_notification_sink("zone-0", "s1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.cursor_seq, 2, "history before the sink is not sent");
    assert_eq!(
        store
            .get_notification_sink("zone-1", "s9")
            .await
            .unwrap()
            .unwrap()
            .cursor_seq,
        0
    );
    assert!(
        store
            .get_notification_sink("zone-1", "s1")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.list_notification_sinks("zone-0").await.unwrap().len(),
        2
    );
    assert_eq!(
        store
            .claim_outbox("t", 10, Duration::from_secs(30))
            .await
            .unwrap()
            .len(),
        1
    );

    // Only approval events are read, within the window asked for.
    let mut later = vec![
        audit("zone-0", "e3", 3),
        audit("zone-0", "e4", 4),
        audit("zone-0", "e5", 5),
        audit("zone-1", "e6", 1),
    ];
    later[0].event_type = "step_up_decided".into();
    later[2].event_type = "step_up_consumed".into();
    later[3].event_type = "step_up_issued".into();
    store.insert_audit_events(&later).await.unwrap();
    let read: Vec<String> = store
        .approval_events("zone-0", 2, 5, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|event| event.id)
        .collect();
    assert_eq!(read, ["e3", "e5"]);
    assert_eq!(
        store
            .approval_events("zone-0", 2, 4, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        store.approval_events("zone-0", 0, 5, 1).await.unwrap()[0].id,
        "e2"
    );

    // Gathering moves the cursor once; a second notifier from the same place is refused.
    let gathered = [delivery("s1", "e3", 10), delivery("s1", "e5", 11)];
    store
        .gather_notifications("s1", 2, 5, &gathered)
        .await
        .unwrap();
    assert!(matches!(
        store.gather_notifications("s1", 2, 5, &gathered).await,
        Err(StoreError::Conflict(_))
    ));
    store
        .gather_notifications("s1", 5, 5, &[delivery("s1", "e5", 12)])
        .await
        .unwrap();
    let listed = store
        .list_notification_deliveries("s1", None, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 2, "one delivery per (sink, event)");
    assert_eq!(listed[0].id, "s1-e5", "newest first");
    let paged = store
        .list_notification_deliveries("s1", Some((listed[0].created_at_ms, &listed[0].id)), 10)
        .await
        .unwrap();
    assert_eq!(paged.len(), 1);
    assert_eq!(paged[0].id, "s1-e3");

    // Due ones only; a failure backs off, a success settles and resets the sink's count.
    let due = store.due_notifications(10, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    let failed = DeliveryOutcome::Failed {
        status: Some(500),
        error: "answered 500".into(),
        retry_at_ms: Some(100),
    };
    store
        .settle_notification(&due[0], &failed, 20)
        .await
        .unwrap();
    assert_eq!(
        store.due_notifications(50, 10).await.unwrap()[0].id,
        "s1-e5"
    );
    let sink_now = store
        .get_notification_sink("zone-0", "s1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sink_now.consecutive_failures, 1);
    assert_eq!(sink_now.last_error.as_deref(), Some("answered 500"));
    let retried = store.due_notifications(100, 10).await.unwrap();
    assert_eq!(retried.len(), 2);
    assert_eq!(retried[1].attempts, 1);
    store
        .settle_notification(
            &retried[1],
            &DeliveryOutcome::Delivered { status: 204 },
            110,
        )
        .await
        .unwrap();
    let abandon = DeliveryOutcome::Failed {
        status: None,
        error: "connection refused".into(),
        retry_at_ms: None,
    };
    store
        .settle_notification(&retried[0], &abandon, 120)
        .await
        .unwrap();
    assert!(
        store
            .due_notifications(i64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let settled = store
        .list_notification_deliveries("s1", None, 10)
        .await
        .unwrap();
    let e3 = settled.iter().find(|d| d.event_id == "e3").unwrap();
    assert_eq!(
        (e3.delivered_at_ms, e3.response_status, e3.attempts),
        (Some(110), Some(204), 2)
    );
    let e5 = settled.iter().find(|d| d.event_id == "e5").unwrap();
    assert_eq!((e5.abandoned_at_ms, e5.attempts), (Some(120), 1));
    assert_eq!(
        store
            .get_notification_sink("zone-0", "s1")
            .await
            .unwrap()
            .unwrap()
            .consecutive_failures,
        1,
        "the success reset it, the abandonment counted"
    );

    // A paused sink is neither followed nor sent; live sinks are those of live zones.
    store
        .gather_notifications("s2", 2, 5, &[delivery("s2", "e3", 10)])
        .await
        .unwrap();
    let mut paused = store
        .get_notification_sink("zone-0", "s2")
        .await
        .unwrap()
        .unwrap();
    paused.active = false;
    paused.name = "renamed".into();
    store.update_notification_sink(&paused, &[]).await.unwrap();
    assert!(
        store
            .due_notifications(i64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let live: Vec<String> = store
        .live_notification_sinks()
        .await
        .unwrap()
        .into_iter()
        .map(|sink| sink.id)
        .collect();
    assert_eq!(live, ["s1", "s9"]);

    // Retention forgets settled rows only; deleting a sink deletes its deliveries.
    assert_eq!(store.purge_notification_deliveries(115).await.unwrap(), 1);
    assert_eq!(
        store
            .list_notification_deliveries("s1", None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    store
        .delete_notification_sink("zone-0", "s2", &[])
        .await
        .unwrap();
    assert!(
        store
            .list_notification_deliveries("s2", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store.delete_notification_sink("zone-1", "s1", &[]).await,
        Err(StoreError::NotFound(_))
    ));
}

/// A dynamically registered application named after its id, created at `now`.
fn registered(id: &str, zone_id: &str, now: i64, expires_at_ms: i64) -> Application {
    Application {
        id: id.into(),
        zone_id: zone_id.into(),
        name: id.into(),
        client_secret_hash: None,
        traits: vec![],
        registration_method: "dcr".into(),
        expires_at_ms: Some(expires_at_ms),
        created_at_ms: now,
        archived_at_ms: None,
    }
}

async fn registered_applications_are_capped_per_zone_even_when_they_race(backend: &Backend) {
    let store = backend.store.as_ref();
    store.create_zone(&zone(1), &[]).await.unwrap();
    store.create_zone(&zone(2), &[]).await.unwrap();
    let now = caracal_store::now_ms();
    let registered =
        |id: &str, zone_id: &str, expires_at_ms: i64| registered(id, zone_id, now, expires_at_ms);
    // A zone that does not accept registration refuses one, whatever its caller read before.
    assert!(matches!(
        store
            .register_dcr_application(&registered("early", "zone-1", now + 60_000), 3, &[])
            .await,
        Err(StoreError::NotFound(_))
    ));
    for (id, slug) in [("zone-1", "zone-1"), ("zone-2", "zone-2")] {
        store
            .update_zone(id, "Zone", slug, true, None, &[])
            .await
            .unwrap();
    }
    // Lapsed, archived, managed and other zones' applications do not count against the cap.
    store
        .register_dcr_application(&registered("lapsed", "zone-1", now - 1), 3, &[])
        .await
        .unwrap();
    store
        .register_dcr_application(&registered("archived", "zone-1", now + 60_000), 3, &[])
        .await
        .unwrap();
    store
        .archive_application("zone-1", "archived", &[])
        .await
        .unwrap();
    let mut managed = registered("managed", "zone-1", now + 60_000);
    managed.registration_method = "managed".into();
    store.create_application(&managed, &[]).await.unwrap();
    store
        .register_dcr_application(&registered("elsewhere", "zone-2", now + 60_000), 1, &[])
        .await
        .unwrap();
    assert_eq!(
        store
            .count_live_dcr_applications("zone-1", now)
            .await
            .unwrap(),
        0
    );

    // Eight registrations at once, from two replicas, against a cap of three.
    let racers: Vec<_> = (0..8)
        .map(|n| {
            let store = if n % 2 == 0 {
                Arc::clone(&backend.store)
            } else {
                Arc::clone(&backend.replica)
            };
            let app = registered(&format!("racer-{n}"), "zone-1", now + 60_000);
            tokio::spawn(async move { store.register_dcr_application(&app, 3, &[]).await })
        })
        .collect();
    let mut admitted = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(()) => admitted += 1,
            Err(StoreError::LimitReached(_)) => {}
            Err(other) => panic!("unexpected: {other:?}"),
        }
    }
    assert_eq!(admitted, 3);
    assert_eq!(
        store
            .count_live_dcr_applications("zone-1", now)
            .await
            .unwrap(),
        3
    );
    assert!(matches!(
        store
            .register_dcr_application(&registered("late", "zone-2", now + 60_000), 1, &[])
            .await,
        Err(StoreError::LimitReached(_))
    ));
    // At the cap, a name already live is refused as a duplicate, not as one too many.
    assert!(matches!(
        store
            .register_dcr_application(&registered("ELSEWHERE", "zone-2", now + 60_000), 1, &[])
            .await,
        Err(StoreError::Conflict(_))
    ));
    // A refused registration leaves nothing behind.
    assert!(
        store
            .get_application("zone-2", "late")
            .await
            .unwrap()
            .is_none()
    );
    // Turning registration off on condition that no registered application is live: refused
    // while one is, and nothing changes; once none is live at the time given, it goes through.
    assert!(matches!(
        store
            .update_zone(
                "zone-1",
                "Renamed",
                "zone-1",
                false,
                Some(now),
                &[message("caracal.test", 1)]
            )
            .await,
        Err(StoreError::LimitReached(_))
    ));
    let kept = store.get_zone("zone-1").await.unwrap().unwrap();
    assert!(kept.dcr_enabled);
    assert_eq!(kept.name, "Zone");
    store
        .update_zone("zone-1", "Zone", "zone-1", false, Some(now + 60_000), &[])
        .await
        .unwrap();
    assert!(!store.get_zone("zone-1").await.unwrap().unwrap().dcr_enabled);
    assert!(matches!(
        store
            .register_dcr_application(&registered("after", "zone-1", now + 60_000), 10, &[])
            .await,
        Err(StoreError::NotFound(_))
    ));
}

/// A registration holds its zone's row locked from its first statement to its commit. Archiving
/// and renaming an application, and the sweep of lapsed ones, lock that row first too, so none
/// of them commits between a registration's reads and its unique-index check: such a commit
/// would let a name read as live through the cap, one registration over it. PostgreSQL only:
/// SQLite's one writer serializes them already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_changes_wait_for_a_registration_holding_their_zone() {
    let Some(backend) = postgres().await else {
        return;
    };
    let store = Arc::clone(&backend.store);
    store.create_zone(&zone(1), &[]).await.unwrap();
    store
        .update_zone("zone-1", "Zone", "zone-1", true, None, &[])
        .await
        .unwrap();
    let now = caracal_store::now_ms();
    for (id, expires_at_ms) in [
        ("archived", now + 60_000),
        ("renamed", now + 60_000),
        ("lapsed", now - 1),
    ] {
        let app = registered(id, "zone-1", now, expires_at_ms);
        store.register_dcr_application(&app, 10, &[]).await.unwrap();
    }

    // Another session holds the zone's row as a registration does, with the same statement.
    let client = session_in(backend.schema.as_deref().unwrap()).await;
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("UPDATE zones SET name = name WHERE id = 'zone-1'")
        .await
        .unwrap();

    let changes = [
        tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.archive_application("zone-1", "archived", &[]).await }
        }),
        tokio::spawn({
            let store = Arc::clone(&store);
            async move {
                let change = caracal_store::ApplicationChange {
                    name: "renamed-again".into(),
                    traits: vec![],
                    client_secret_hash: None,
                };
                store
                    .update_application("zone-1", "renamed", &change, &[])
                    .await
            }
        }),
        tokio::spawn({
            let store = Arc::clone(&store);
            async move {
                store
                    .archive_lapsed_dcr_applications(now)
                    .await
                    .map(|archived| assert_eq!(archived, 1))
            }
        }),
    ];
    tokio::time::sleep(Duration::from_millis(500)).await;
    for change in &changes {
        assert!(
            !change.is_finished(),
            "a change committed while a registration held the zone"
        );
    }
    client.batch_execute("COMMIT").await.unwrap();
    for change in changes {
        change.await.unwrap().unwrap();
    }
    assert_eq!(
        store
            .count_live_dcr_applications("zone-1", now)
            .await
            .unwrap(),
        1
    );
    drop_schema(backend.schema.as_deref().unwrap()).await;
}

/// A write that fails for a condition of the server (a full disk, a shutdown, a lost
/// connection, a failover to a standby, a concurrency abort) is unavailable, which callers
/// retry, never a refusal of the write itself, which an audit ingestor would dead-letter.
/// PostgreSQL only; the embedded store's full disk is `sqlite::tests`. A trigger in the test's
/// schema raises each condition's SQLSTATE from inside the store's own statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_conditions_are_unavailable_and_a_refused_statement_is_not() {
    let Some(backend) = postgres().await else {
        return;
    };
    let schema = backend.schema.clone().unwrap();
    let client = session_in(&schema).await;
    client
        .batch_execute(
            "CREATE TABLE injected_failure (code TEXT NOT NULL);
             CREATE FUNCTION fail_injected() RETURNS trigger LANGUAGE plpgsql AS $$
             DECLARE injected TEXT;
             BEGIN
               SELECT code INTO injected FROM injected_failure;
               IF injected IS NOT NULL THEN
                 RAISE EXCEPTION 'injected failure' USING ERRCODE = injected;
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER fail_injected BEFORE INSERT ON zones
               FOR EACH ROW EXECUTE FUNCTION fail_injected();",
        )
        .await
        .unwrap();
    let store = Arc::clone(&backend.store);
    let inject = |code: &'static str| {
        let client = &client;
        async move {
            client
                .batch_execute(&format!(
                    "DELETE FROM injected_failure; INSERT INTO injected_failure VALUES ('{code}')"
                ))
                .await
                .unwrap();
        }
    };
    let transient = [
        "53100", // disk_full
        "53300", // too_many_connections
        "57P01", // admin_shutdown
        "57P03", // cannot_connect_now
        "08006", // connection_failure
        "58030", // io_error
        "25006", // read_only_sql_transaction: a standby after a failover
        "40001", // serialization_failure
        "40P01", // deadlock_detected
        "55P03", // lock_not_available
    ];
    for code in transient {
        inject(code).await;
        let refused = store.create_zone(&zone(1), &[]).await.unwrap_err();
        assert!(
            matches!(&refused, StoreError::Unavailable(message) if message.contains(code)),
            "{code}: {refused:?}"
        );
    }
    for code in ["22023", "P0001"] {
        inject(code).await;
        let refused = store.create_zone(&zone(1), &[]).await.unwrap_err();
        assert!(
            matches!(refused, StoreError::Query(_)),
            "{code}: {refused:?}"
        );
    }
    assert!(store.get_zone("zone-1").await.unwrap().is_none());
    client
        .batch_execute("DELETE FROM injected_failure")
        .await
        .unwrap();
    store.create_zone(&zone(1), &[]).await.unwrap();
    assert!(store.get_zone("zone-1").await.unwrap().is_some());
    drop_schema(&schema).await;
}
