//! Backend outages: the roles fail closed while PostgreSQL or Redis is unreachable and recover
//! without a restart; a stream burst across a Redis connection loss loses nothing and is handled
//! once. Outages are made with a TCP proxy in front of the shared servers, so other tests keep
//! their connections. PostgreSQL and Redis are required (see `crates/bus/tests/backends`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use caracal_bus::signature::StreamKey;
use caracal_bus::{Consumer, ConsumerConfig, Producer, RedisBus};
use caracal_core::Role;
use caracal_services::evidence::{Evidence, EvidenceConfig};
use caracal_services::outbox::{Dispatcher, DispatcherConfig};
use caracal_services::{Bus, RoleState, Shared, router};
use caracal_store::prelude::*;
use caracal_store::{NewZone, OutboxMessage, PgOptions, PgStore, SqliteStore, Store};
use http_body_util::BodyExt as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::ServiceExt as _;

const POSTGRES: &str = "127.0.0.1:5432";
const REDIS: &str = "127.0.0.1:6379";

fn external_backends() -> bool {
    let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
    let opted_out = std::env::var("CARACAL_TEST_SKIP_EXTERNAL").is_ok_and(|value| value == "1");
    assert!(
        !(in_ci && opted_out),
        "CARACAL_TEST_SKIP_EXTERNAL is refused when CI=true"
    );
    !opted_out
}

/// A TCP forwarder that can be cut (listener and every connection closed) and restored on the
/// same port.
struct Proxy {
    port: u16,
    upstream: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut proxy = Proxy {
            port: listener.local_addr().unwrap().port(),
            upstream: upstream.parse().unwrap(),
            task: None,
        };
        proxy.task = Some(Self::serve(listener, proxy.upstream));
        proxy
    }

    fn serve(listener: TcpListener, upstream: SocketAddr) -> JoinHandle<()> {
        tokio::spawn(async move {
            // Dropping the set (when this task is aborted) aborts every forwarding task.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        })
    }

    fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    async fn restore(&mut self) {
        for _ in 0..50 {
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", self.port)).await {
                self.task = Some(Self::serve(listener, self.upstream));
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("could not rebind the proxy port {}", self.port);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn ready_reason(app: &axum::Router) -> (u16, Option<String>) {
    let response = app
        .clone()
        .oneshot(http::Request::get("/ready").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    (status, body["reason"].as_str().map(str::to_owned))
}

/// Polls until `check` holds or `limit` passes; returns whether it held.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_fails_closed_and_recovers_without_a_restart() {
    if !external_backends() {
        return;
    }
    let mut proxy = Proxy::start(POSTGRES).await;
    let schema = format!("test_{}", uuid::Uuid::now_v7().simple());
    let options = PgOptions {
        pool_size: 4,
        statement_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        schema: Some(schema.clone()),
    };
    let url = format!("postgres://postgres@127.0.0.1:{}/test", proxy.port);
    let store: Arc<dyn Store> = Arc::new(PgStore::connect(&url, &options).await.unwrap());
    let bus = Bus::redis(
        RedisBus::connect(&format!("redis://{REDIS}"))
            .await
            .unwrap(),
    );
    let replay = tempfile::tempdir().unwrap();
    let producer = Producer::new(Arc::clone(&bus.streams), StreamKey::new(b"k"));
    let (evidence, _evidence_tasks) =
        Evidence::start(producer, EvidenceConfig::new(replay.path().to_owned())).unwrap();
    let app = router(RoleState::new(
        Role::Api,
        Shared::new(
            Arc::clone(&store),
            bus,
            evidence,
            replay.path().to_owned(),
            caracal_crypto::Kek::generate().unwrap(),
        ),
    ));
    assert_eq!(ready_reason(&app).await, (200, None));

    // Load while the database goes away.
    let load = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(4) {
                match store.outbox_stats().await {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut();
    let failed_closed = eventually(Duration::from_secs(5), || async {
        let (status, reason) = ready_reason(&app).await;
        status == 503
            && matches!(
                reason.as_deref(),
                Some("store_unreachable" | "store_timeout")
            )
    })
    .await;
    assert!(
        failed_closed,
        "readiness must fail closed while the store is unreachable"
    );
    assert!(store.ping().await.is_err());
    tokio::time::sleep(Duration::from_millis(500)).await;

    proxy.restore().await;
    let recovered = eventually(Duration::from_secs(10), || async {
        ready_reason(&app).await == (200, None)
    })
    .await;
    assert!(
        recovered,
        "the same process recovers once the store is back"
    );
    let (ok, failed) = load.await.unwrap();
    assert!(
        ok > 0 && failed > 0,
        "load saw both the outage and the recovery: {ok} ok, {failed} failed"
    );

    let (client, connection) = tokio_postgres::connect(
        &format!("postgres://postgres@{POSTGRES}/test"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_during_a_burst_loses_nothing_and_handles_each_message_once() {
    if !external_backends() {
        return;
    }
    let proxy = Proxy::start(REDIS).await;
    let url = format!("redis://127.0.0.1:{}", proxy.port);
    burst_across(&url, || async move {
        let mut proxy = proxy;
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.restore().await;
        proxy
    })
    .await;
}

/// A Redis server of this test's own, persisting every write (AOF, fsync always), so it can
/// be killed and restarted without touching the shared server.
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
    directory: tempfile::TempDir,
}

impl PrivateRedis {
    async fn start(port: u16, directory: tempfile::TempDir) -> PrivateRedis {
        let child = Self::spawn(port, directory.path());
        Self::wait_up(port).await;
        PrivateRedis {
            child,
            port,
            directory,
        }
    }

    fn spawn(port: u16, directory: &std::path::Path) -> std::process::Child {
        std::process::Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(directory)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (the CI machine has it)")
    }

    async fn wait_up(port: u16) {
        let url = format!("redis://127.0.0.1:{port}");
        let up = eventually(Duration::from_secs(10), || async {
            match redis::Client::open(url.as_str())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
            {
                Ok(mut connection) => redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        })
        .await;
        assert!(up, "private redis-server did not start on port {port}");
    }

    /// SIGKILL (no chance to flush anything beyond what was already fsynced), then start again
    /// on the same port and data.
    async fn crash_and_restart(mut self) -> PrivateRedis {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.child = Self::spawn(self.port, self.directory.path());
        Self::wait_up(self.port).await;
        self
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_during_a_burst_loses_nothing_and_handles_each_message_once() {
    if !external_backends() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redis = PrivateRedis::start(port, tempfile::tempdir().unwrap()).await;
    let url = format!("redis://127.0.0.1:{port}");
    burst_across(&url, || async move { redis.crash_and_restart().await }).await;
}

/// Streams 300 outbox messages through Redis at `url` while `outage` runs mid-burst; asserts
/// nothing is lost and nothing is handled twice. Returns what `outage` returned (to keep alive).
async fn burst_across<F, Fut, T>(url: &str, outage: F) -> T
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    const MESSAGES: usize = 300;
    let prefix = format!("test:{}:", uuid::Uuid::now_v7());
    let stream = format!("{prefix}caracal.sessions.revoke");
    let directory = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&directory.path().join("store.db")).unwrap();
    // Rows keep arriving for the whole test, before, during and after the outage.
    let producing = {
        let (sqlite, stream) = (sqlite.clone(), stream.clone());
        tokio::spawn(async move {
            for n in 0..MESSAGES {
                let zone = NewZone {
                    id: format!("zone-{n}"),
                    name: format!("zone {n}"),
                    slug: format!("zone-{n}"),
                };
                let message = OutboxMessage {
                    stream: stream.clone(),
                    fields: BTreeMap::from([("n".to_owned(), n.to_string())]),
                    dedupe_key: Some(format!("revoke-{n}")),
                };
                sqlite.create_zone(&zone, &[message]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
        })
    };

    let key = StreamKey::new(b"burst key");
    let producer_bus = Arc::new(RedisBus::connect(url).await.unwrap());
    let consumer_bus = Arc::new(RedisBus::connect(url).await.unwrap());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let dispatcher = Dispatcher::new(
        Arc::new(sqlite.clone()),
        Producer::new(producer_bus, key.clone()),
        DispatcherConfig {
            batch: 20,
            max_attempts: 1000,
            idle_poll: Duration::from_millis(10),
            ..DispatcherConfig::new("burst".into())
        },
        None,
    );
    let dispatching = tokio::spawn(dispatcher.run(stopped.clone()));

    let consumer = Consumer::start(
        consumer_bus,
        key,
        ConsumerConfig {
            stream: stream.clone(),
            group: "gateway-1".into(),
            consumer: "gateway-1".into(),
            batch: 10,
            block: Duration::from_millis(50),
            reclaim_idle: Duration::from_millis(300),
            max_deliveries: 1000,
            dedupe_window: 10_000,
        },
    )
    .await
    .unwrap();
    let handled = Arc::new(Mutex::new(Vec::<usize>::new()));
    let consuming = {
        let handled = Arc::clone(&handled);
        let stopped = stopped.clone();
        tokio::spawn(async move {
            let mut errors = 0u32;
            while !*stopped.borrow() {
                match consumer.poll().await {
                    Ok(batch) => {
                        let ids: Vec<String> = batch.iter().map(|entry| entry.id.clone()).collect();
                        handled.lock().unwrap().extend(
                            batch
                                .iter()
                                .map(|entry| entry.fields["n"].parse::<usize>().unwrap()),
                        );
                        let _ = consumer.ack(&ids).await;
                    }
                    Err(_) => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            errors
        })
    };

    let started = eventually(Duration::from_secs(10), || async {
        handled.lock().unwrap().len() >= 30
    })
    .await;
    assert!(started, "the burst started");
    let handled_at_cut = handled.lock().unwrap().len();
    let kept = outage().await;
    let complete = eventually(Duration::from_secs(40), || async {
        handled
            .lock()
            .unwrap()
            .iter()
            .collect::<BTreeSet<_>>()
            .len()
            == MESSAGES
    })
    .await;
    producing.await.unwrap();
    stop.send(true).unwrap();
    dispatching.await.unwrap();
    let consumer_errors = consuming.await.unwrap();
    assert!(
        handled_at_cut < MESSAGES / 2,
        "the outage hit mid-burst ({handled_at_cut} handled before it)"
    );
    assert!(consumer_errors > 0, "the consumer saw the outage");

    let handled = handled.lock().unwrap().clone();
    let distinct: BTreeSet<usize> = handled.iter().copied().collect();
    assert!(
        complete,
        "only {} of {MESSAGES} messages arrived",
        distinct.len()
    );
    assert_eq!(
        distinct,
        (0..MESSAGES).collect::<BTreeSet<_>>(),
        "nothing lost"
    );
    assert_eq!(handled.len(), MESSAGES, "nothing handled twice");
    assert_eq!(sqlite.outbox_stats().await.unwrap().pending, 0);

    let client = redis::Client::open(url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut connection)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    kept
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_sees_every_revocation_through_its_own_group() {
    if !external_backends() {
        return;
    }
    let stream = format!("test:{}:caracal.sessions.revoke", uuid::Uuid::now_v7());
    let key = StreamKey::new(b"shared deployment key");
    // Two replicas: separate connections, one consumer group each, as each Gateway replica runs.
    let mut replicas = Vec::new();
    for replica in ["gateway-a", "gateway-b"] {
        let bus = Arc::new(
            RedisBus::connect(&format!("redis://{REDIS}"))
                .await
                .unwrap(),
        );
        let config = ConsumerConfig {
            stream: stream.clone(),
            group: replica.into(),
            consumer: replica.into(),
            batch: 100,
            block: Duration::from_millis(50),
            reclaim_idle: Duration::from_secs(30),
            max_deliveries: 5,
            dedupe_window: 1000,
        };
        replicas.push(Consumer::start(bus, key.clone(), config).await.unwrap());
    }
    let producer = Producer::new(
        Arc::new(
            RedisBus::connect(&format!("redis://{REDIS}"))
                .await
                .unwrap(),
        ),
        key,
    );
    for n in 0..50 {
        let fields = BTreeMap::from([
            ("zone_id".to_owned(), "zone-1".to_owned()),
            ("agent_session_id".to_owned(), format!("session-{n}")),
            ("reason".to_owned(), "terminated".to_owned()),
        ]);
        producer.publish(&stream, fields).await.unwrap();
    }
    for replica in &replicas {
        let mut seen = BTreeSet::new();
        while seen.len() < 50 {
            let batch = replica.poll().await.unwrap();
            assert!(
                !batch.is_empty(),
                "a replica missed revocations: saw {}",
                seen.len()
            );
            replica
                .ack(
                    &batch
                        .iter()
                        .map(|entry| entry.id.clone())
                        .collect::<Vec<_>>(),
                )
                .await
                .unwrap();
            seen.extend(
                batch
                    .iter()
                    .map(|entry| entry.fields["agent_session_id"].clone()),
            );
        }
        assert_eq!(seen.len(), 50);
    }
    let client = redis::Client::open(format!("redis://{REDIS}")).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut connection)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_evidence_survives_a_redis_outage_through_replay_files_nothing_lost_or_doubled() {
    use caracal_services::evidence::{Evidence, EvidenceConfig};
    use caracal_services::ledger::ingest::{GROUP, IngestMetrics, Ingestor};
    use caracal_store::prelude::*;
    if !external_backends() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = PrivateRedis::start(port, tempfile::tempdir().unwrap()).await;
    let url = format!("redis://127.0.0.1:{port}");
    let key = StreamKey::new(b"audit key");
    let directory = tempfile::tempdir().unwrap();
    let replay_dir = directory.path().join("audit-replay");
    let bus = Arc::new(RedisBus::connect(&url).await.unwrap());
    let mut config = EvidenceConfig::new(replay_dir.clone());
    config.replay_interval = Duration::from_millis(100);
    let (evidence, tasks) =
        Evidence::start(Producer::new(bus.clone(), key.clone()), config).unwrap();
    let event = |n: usize| caracal_audit::Event {
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
        occurred_at_ms: 1,
    };
    for n in 0..20 {
        evidence.record(event(n)).await.unwrap();
    }
    // Redis stops: every record still succeeds, into fsynced replay files.
    redis.child.kill().unwrap();
    redis.child.wait().unwrap();
    for n in 20..60 {
        evidence.record(event(n)).await.unwrap();
    }
    assert!(!evidence.is_lost());
    assert!(
        std::fs::read_dir(&replay_dir).unwrap().count() > 0,
        "replay files grew"
    );
    assert!(evidence.metrics().spilled_total.get() > 0);

    // Redis is back (same data, AOF): the replay files drain.
    redis = redis.crash_and_restart().await;
    let drained = eventually(Duration::from_secs(20), || async {
        std::fs::read_dir(&replay_dir).unwrap().count() == 0
    })
    .await;
    assert!(drained, "replay files were re-sent");
    tasks.shutdown().await;

    let store = SqliteStore::open(&directory.path().join("ledger.db")).unwrap();
    let consumer = Consumer::start(
        bus.clone(),
        key,
        ConsumerConfig {
            stream: caracal_bus::stream_names::AUDIT_EVENTS.into(),
            group: GROUP.into(),
            consumer: "audit-drill".into(),
            batch: 100,
            block: Duration::from_millis(50),
            reclaim_idle: Duration::from_secs(30),
            max_deliveries: 8,
            dedupe_window: 1000,
        },
    )
    .await
    .unwrap();
    let ingestor = Ingestor::new(
        Arc::new(store.clone()),
        consumer,
        caracal_crypto::Kek::generate().unwrap(),
        Arc::new(IngestMetrics::default()),
    );
    while ingestor.ingest_once().await.unwrap() > 0 {}
    let rows = store.audit_range("zone-1", 1, 1000).await.unwrap();
    let ids: BTreeSet<String> = rows.iter().map(|row| row.id.clone()).collect();
    assert_eq!(ids.len(), 60, "nothing lost");
    assert_eq!(rows.len(), 60, "nothing doubled");
    drop(redis);
}
