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
use caracal_store::{
    KekRecord, NewAdminToken, NewZone, OutboxFailure, OutboxMessage, PgOptions, PgStore,
    SqliteStore, Store, StoreError, TokenScope,
};

struct Backend {
    store: Arc<dyn Store>,
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
        store: Arc::new(store),
        replica: Arc::new(replica),
        schema: Some(schema),
        _directory: None,
    })
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
    the_deployment_kek_is_recorded_once,
    admin_tokens_are_found_by_digest_only,
    a_zone_and_its_outbox_rows_commit_together,
    outbox_rows_are_claimed_oldest_first_and_never_twice,
    failed_rows_back_off_then_die_at_the_bound,
    a_dead_dispatchers_claims_expire,
    leases_admit_one_holder_at_a_time,
    concurrent_dispatchers_claim_disjoint_rows,
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
    store.insert_admin_token(&new).await.unwrap();
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
        store.insert_admin_token(&duplicate).await,
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

    let stats = backend.store.outbox_stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead), (3, 0));
    assert!(stats.oldest_pending_age.unwrap() >= Duration::from_millis(10));
    let ids: Vec<i64> = first.iter().chain(&second).map(|row| row.id).collect();
    backend.store.outbox_published(&ids).await.unwrap();
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
    let ttl = Duration::from_millis(200);
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        b.try_lease("audit-sweep", "replica-b", ttl).await.unwrap(),
        "an expired lease moves"
    );
    b.release_lease("audit-sweep", "replica-b").await.unwrap();
    assert!(a.try_lease("audit-sweep", "replica-a", ttl).await.unwrap());
}

async fn concurrent_dispatchers_claim_disjoint_rows(backend: &Backend) {
    enqueue(backend, 0, 60).await;
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let store = if worker % 2 == 0 {
                Arc::clone(&backend.store)
            } else {
                Arc::clone(&backend.replica)
            };
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let rows = store
                        .claim_outbox(&format!("w{worker}"), 7, Duration::from_secs(30))
                        .await
                        .unwrap();
                    if rows.is_empty() {
                        return mine;
                    }
                    mine.extend(rows.into_iter().map(|row| row.id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    let distinct: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(
        (all.len(), distinct.len()),
        (60, 60),
        "every row claimed exactly once"
    );
}
