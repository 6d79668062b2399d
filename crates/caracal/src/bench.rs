//! `caracal bench backends`: the embedded and the distributed backends measured side by side
//! in one run (the machine is shared and noisy, so only same-run ratios mean much).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use caracal_bus::signature::StreamKey;
use caracal_bus::{EmbeddedBus, Producer, RedisBus, Streams};
use caracal_services::group_commit::AuthorityWriter;
use caracal_services::outbox::{Dispatcher, DispatcherConfig};
use caracal_store::{
    AuthorityRecord, NewZone, OutboxMessage, PgOptions, PgStore, SqliteStore, Store,
};

use crate::cli::BenchArgs;

/// One measured backend pair: what runs where.
struct Backends {
    sqlite: SqliteStore,
    embedded: Arc<EmbeddedBus>,
    postgres: PgStore,
    redis: Arc<RedisBus>,
    prefix: String,
}

struct Row {
    name: &'static str,
    embedded: f64,
    distributed: f64,
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let count = if args.quick { 200 } else { args.messages };
    let scratch = Scratch::create(args, "backends", 16).await?;
    let redis = RedisBus::connect(&args.redis)
        .await
        .with_context(|| format!("Redis at {}", caracal_store::redact_url(&args.redis)))?;
    let backends = Backends {
        embedded: Arc::new(EmbeddedBus::new(scratch.sqlite.clone())),
        sqlite: scratch.sqlite.clone(),
        postgres: scratch.postgres.clone(),
        redis: Arc::new(redis),
        prefix: format!("bench:{}:", scratch.run_id),
    };

    println!(
        "caracal bench backends: {count} messages per case; embedded = SQLite + in-process streams, \
         distributed = PostgreSQL + Redis; {} cores",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let mut rows = Vec::new();
    rows.push(stream_append(&backends, count, 1).await?);
    rows.push(stream_append(&backends, count, 32).await?);
    rows.push(stream_append_batched(&backends, count).await?);
    rows.push(stream_consume(&backends, count).await?);
    rows.push(outbox_drain(&backends, count).await?);
    let (single, grouped) = authority_inserts(&backends, count).await?;
    rows.push(single);
    rows.push(grouped);

    println!(
        "{:<48} {:>16} {:>16} {:>12}",
        "case (operations per second)", "embedded", "distributed", "dist/emb"
    );
    for row in &rows {
        println!(
            "{:<48} {:>16.0} {:>16.0} {:>11.2}x",
            row.name,
            row.embedded,
            row.distributed,
            row.distributed / row.embedded.max(f64::MIN_POSITIVE)
        );
    }
    if let [.., single, grouped] = rows.as_slice() {
        println!(
            "AuthorityWriter over separate writes: embedded {:.1}x (its writer thread groups both), distributed {:.1}x",
            grouped.embedded / single.embedded.max(f64::MIN_POSITIVE),
            grouped.distributed / single.distributed.max(f64::MIN_POSITIVE)
        );
    }

    scratch.remove(&args.postgres).await;
    remove_redis_keys(&args.redis, &backends.prefix).await;
    Ok(())
}

/// A run's own temporary directory with a SQLite store in it, and a PostgreSQL store in a schema
/// of its own, so concurrent runs and earlier crashed runs never meet.
pub(crate) struct Scratch {
    pub(crate) run_id: String,
    directory: std::path::PathBuf,
    pub(crate) schema: String,
    pub(crate) sqlite: SqliteStore,
    pub(crate) postgres: PgStore,
}

impl Scratch {
    pub(crate) async fn create(
        args: &BenchArgs,
        bench: &str,
        pool_size: usize,
    ) -> anyhow::Result<Scratch> {
        let run_id = uuid::Uuid::now_v7().simple().to_string();
        let directory = std::env::temp_dir().join(format!("caracal-bench-{bench}-{run_id}"));
        std::fs::create_dir_all(&directory)?;
        let schema = format!("bench_{run_id}");
        let sqlite = SqliteStore::open(&directory.join("bench.db"))?;
        let postgres = PgStore::connect(
            &args.postgres,
            &PgOptions {
                pool_size,
                schema: Some(schema.clone()),
                ..PgOptions::default()
            },
        )
        .await
        .with_context(|| {
            format!(
                "PostgreSQL at {}",
                caracal_store::redact_url(&args.postgres)
            )
        })?;
        Ok(Scratch {
            run_id,
            directory,
            schema,
            sqlite,
            postgres,
        })
    }

    /// Best effort: a leftover schema or directory costs space, never correctness.
    pub(crate) async fn remove(&self, postgres: &str) {
        if let Ok((client, connection)) =
            tokio_postgres::connect(postgres, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
                .await;
        }
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn message(n: usize) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("zone_id".to_owned(), "zone-bench".to_owned()),
        ("agent_session_id".to_owned(), format!("session-{n}")),
        ("reason".to_owned(), "bench".to_owned()),
    ])
}

async fn append_with(
    streams: Arc<dyn Streams>,
    stream: &str,
    count: usize,
    producers: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let per_producer = count.div_ceil(producers);
    let mut tasks = tokio::task::JoinSet::new();
    for producer in 0..producers {
        let (streams, stream) = (Arc::clone(&streams), stream.to_owned());
        tasks.spawn(async move {
            for n in 0..per_producer {
                streams
                    .append(&stream, &message(producer * per_producer + n))
                    .await?;
            }
            Ok::<_, caracal_bus::BusError>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(rate(per_producer * producers, started.elapsed()))
}

async fn stream_append(backends: &Backends, count: usize, producers: usize) -> anyhow::Result<Row> {
    let stream = format!("{}append{producers}", backends.prefix);
    Ok(Row {
        name: if producers == 1 {
            "stream append, 1 producer"
        } else {
            "stream append, 32 producers"
        },
        embedded: append_with(backends.embedded.clone(), &stream, count, producers).await?,
        distributed: append_with(backends.redis.clone(), &stream, count, producers).await?,
    })
}

async fn append_batches_with(
    streams: Arc<dyn Streams>,
    stream: &str,
    count: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut appended = 0;
    while appended < count {
        let batch: Vec<BTreeMap<String, String>> = (appended..(appended + 100).min(count))
            .map(message)
            .collect();
        appended += streams.append_many(stream, &batch).await?.len();
    }
    Ok(rate(appended, started.elapsed()))
}

async fn stream_append_batched(backends: &Backends, count: usize) -> anyhow::Result<Row> {
    let stream = format!("{}batched", backends.prefix);
    Ok(Row {
        name: "stream append, batches of 100",
        embedded: append_batches_with(backends.embedded.clone(), &stream, count).await?,
        distributed: append_batches_with(backends.redis.clone(), &stream, count).await?,
    })
}

async fn consume_with(
    streams: Arc<dyn Streams>,
    stream: &str,
    count: usize,
) -> anyhow::Result<f64> {
    streams.ensure_group(stream, "bench").await?;
    append_with(Arc::clone(&streams), stream, count, 8).await?;
    let started = Instant::now();
    let mut consumed = 0;
    while consumed < count {
        let entries = streams
            .read_group(stream, "bench", "c", 256, Duration::from_millis(100))
            .await?;
        anyhow::ensure!(
            !entries.is_empty(),
            "stream ran dry after {consumed} of {count}"
        );
        let ids: Vec<String> = entries.iter().map(|entry| entry.id.clone()).collect();
        streams.ack(stream, "bench", &ids).await?;
        consumed += entries.len();
    }
    Ok(rate(consumed, started.elapsed()))
}

async fn stream_consume(backends: &Backends, count: usize) -> anyhow::Result<Row> {
    let stream = format!("{}consume", backends.prefix);
    Ok(Row {
        name: "stream consume (read 256 + ack)",
        embedded: consume_with(backends.embedded.clone(), &stream, count).await?,
        distributed: consume_with(backends.redis.clone(), &stream, count).await?,
    })
}

async fn drain_with(
    store: Arc<dyn Store>,
    streams: Arc<dyn Streams>,
    stream: &str,
    count: usize,
) -> anyhow::Result<f64> {
    // Rows arrive as a real write path writes them: 100 messages with each change.
    for chunk in 0..count.div_ceil(100) {
        let outbox: Vec<OutboxMessage> = (0..100)
            .map(|n| OutboxMessage {
                stream: stream.to_owned(),
                fields: message(chunk * 100 + n),
                dedupe_key: Some(format!("{stream}-{chunk}-{n}")),
            })
            .collect();
        let zone = NewZone {
            id: format!("{stream}-zone-{chunk}"),
            name: "bench".into(),
            slug: format!("{stream}-zone-{chunk}"),
        };
        store.create_zone(&zone, &outbox).await?;
    }
    let dispatcher = Dispatcher::new(
        Arc::clone(&store),
        Producer::new(streams, StreamKey::new(b"bench key")),
        DispatcherConfig::new("bench".into()),
        None,
    );
    let started = Instant::now();
    let mut drained = 0;
    loop {
        let handled = dispatcher.drain_once().await?;
        if handled == 0 {
            break;
        }
        drained += handled;
    }
    Ok(rate(drained, started.elapsed()))
}

async fn outbox_drain(backends: &Backends, count: usize) -> anyhow::Result<Row> {
    let stream = format!("{}outbox", backends.prefix);
    Ok(Row {
        name: "outbox drain (claim, sign, publish, mark)",
        embedded: drain_with(
            Arc::new(backends.sqlite.clone()),
            backends.embedded.clone(),
            &stream,
            count,
        )
        .await?,
        distributed: drain_with(
            Arc::new(backends.postgres.clone()),
            backends.redis.clone(),
            &stream,
            count,
        )
        .await?,
    })
}

fn authority(id: String) -> AuthorityRecord {
    let now = caracal_store::now_ms();
    AuthorityRecord {
        id,
        zone_id: "zone-bench".into(),
        session_type: "application".into(),
        subject_id: "bench-app".into(),
        parent_id: None,
        status: "active".into(),
        claims: r#"{"scope":"crm:read","aud":"resource://crm"}"#.into(),
        expires_at_ms: now + 600_000,
        authenticated_at_ms: now,
        created_at_ms: now,
        revoked_at_ms: None,
        revoked_reason: None,
    }
}

async fn single_commits(store: Arc<dyn Store>, tag: &str, count: usize) -> anyhow::Result<f64> {
    // 64 concurrent minters, each committing its own record.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..64 {
        let store = Arc::clone(&store);
        let tag = tag.to_owned();
        tasks.spawn(async move {
            for n in (worker..count).step_by(64) {
                store
                    .insert_authority_records(&[authority(format!("{tag}-single-{n}"))])
                    .await?;
            }
            Ok::<_, caracal_store::StoreError>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(rate(count, started.elapsed()))
}

async fn group_commits(store: Arc<dyn Store>, tag: &str, count: usize) -> anyhow::Result<f64> {
    // The writer the STS uses: direct on SQLite (its writer thread groups), grouped elsewhere.
    let writer = AuthorityWriter::start(store, 256);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..64 {
        let writer = writer.clone();
        let tag = tag.to_owned();
        tasks.spawn(async move {
            for n in (worker..count).step_by(64) {
                writer.write(authority(format!("{tag}-group-{n}"))).await?;
            }
            Ok::<_, caracal_store::StoreError>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(rate(count, started.elapsed()))
}

async fn authority_inserts(backends: &Backends, count: usize) -> anyhow::Result<(Row, Row)> {
    let sqlite: Arc<dyn Store> = Arc::new(backends.sqlite.clone());
    let postgres: Arc<dyn Store> = Arc::new(backends.postgres.clone());
    let single = Row {
        name: "authority records, 64 minters, each its own write",
        embedded: single_commits(Arc::clone(&sqlite), "sqlite", count).await?,
        distributed: single_commits(Arc::clone(&postgres), "pg", count).await?,
    };
    let grouped = Row {
        name: "authority records, 64 minters, AuthorityWriter",
        embedded: group_commits(sqlite, "sqlite", count).await?,
        distributed: group_commits(postgres, "pg", count).await?,
    };
    Ok((single, grouped))
}

async fn remove_redis_keys(redis: &str, prefix: &str) {
    if let Ok(client) = redis::Client::open(redis)
        && let Ok(mut connection) = client.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut connection)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut connection)
                .await;
        }
    }
}

/// `caracal bench audit`: ingestion rate, sweep verification rate and stored bytes per event,
/// embedded beside distributed (PostgreSQL store; the stream is embedded in both so the store
/// is what is compared).
pub async fn audit(args: &BenchArgs) -> anyhow::Result<()> {
    use caracal_audit::Event;
    use caracal_services::evidence::{Evidence, EvidenceConfig};
    use caracal_services::ledger::ingest::{IngestMetrics, Ingestor, consumer_config};
    use caracal_services::ledger::sweep::{SweepMetrics, Sweeper};

    let count = if args.quick { 500 } else { args.messages };
    let scratch = Scratch::create(args, "audit", 8).await?;
    let Scratch {
        directory,
        schema,
        sqlite,
        postgres,
        ..
    } = &scratch;
    let kek = caracal_crypto::Kek::generate()?;
    let key = StreamKey::new(b"bench key");
    let event = |n: usize| Event {
        id: uuid::Uuid::now_v7().to_string(),
        zone_id: format!("zone-{}", n % 4),
        event_type: "gateway.request".into(),
        request_id: uuid::Uuid::now_v7().to_string(),
        decision: if n.is_multiple_of(10) {
            "deny"
        } else {
            "allow"
        }
        .into(),
        policy_set_id: Some("ps_01J9ZQ7M3K".into()),
        policy_set_version_id: Some("psv_01J9ZQ7M3K_3".into()),
        manifest_sha: None,
        evaluation_status: "complete".into(),
        determining_policies_json: serde_json::json!([{"id": "baseline-resource-scope"}]),
        diagnostics_json: serde_json::json!([]),
        metadata_json: serde_json::json!({
            "resource": "resource://crm",
            "agent_session_id": format!("ses_{n:08}"),
            "latency_ms": 1
        }),
        occurred_at_ms: caracal_store::now_ms(),
    };

    let mut results = Vec::new();
    for (name, store) in [
        ("embedded", Arc::new(sqlite.clone()) as Arc<dyn Store>),
        ("distributed", Arc::new(postgres.clone()) as Arc<dyn Store>),
    ] {
        // Each run has its own embedded stream, so only the store differs.
        let bus_dir = directory.join(format!("bus-{name}"));
        std::fs::create_dir_all(&bus_dir)?;
        let bus = Arc::new(EmbeddedBus::new(SqliteStore::open(
            &bus_dir.join("bus.db"),
        )?));
        let (evidence, tasks) = Evidence::start(
            Producer::new(bus.clone(), key.clone()),
            EvidenceConfig::new(bus_dir.join("replay")),
        )?;
        let mut producers = tokio::task::JoinSet::new();
        for worker in 0..32 {
            let evidence = evidence.clone();
            let events: Vec<Event> = (worker..count).step_by(32).map(event).collect();
            producers.spawn(async move {
                for event in events {
                    evidence.record(event).await?;
                }
                Ok::<_, caracal_services::evidence::EvidenceError>(())
            });
        }
        while let Some(result) = producers.join_next().await {
            result??;
        }
        tasks.shutdown().await;

        let consumer = caracal_bus::Consumer::start(
            bus.clone(),
            key.clone(),
            consumer_config("bench".into(), std::time::Duration::from_secs(30)),
        )
        .await?;
        let ingestor = Ingestor::new(
            Arc::clone(&store),
            consumer,
            kek.clone(),
            Arc::new(IngestMetrics::default()),
        );
        let started = Instant::now();
        let ingested = ingestor
            .ingest_while(|handled| handled < count)
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        anyhow::ensure!(
            ingested >= count,
            "ingestion stalled at {ingested} of {count}"
        );
        let ingest_rate = rate(ingested, started.elapsed());

        let sweeper = Sweeper::new(
            Arc::clone(&store),
            kek.clone(),
            Arc::new(SweepMetrics::default()),
        );
        let started = Instant::now();
        let findings = sweeper.full().await?;
        anyhow::ensure!(
            findings.is_empty(),
            "the bench ledger has findings: {findings:?}"
        );
        let sweep_rate = rate(count, started.elapsed());
        results.push((name, ingest_rate, sweep_rate));
    }

    let sqlite_bytes = sqlite
        .run_alone(|connection| {
            // This database holds only the ledger: its compacted size is the ledger's size.
            connection.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM;")?;
            connection.query_row(
                "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                [],
                |row| row.get::<_, i64>(0),
            )
        })
        .await
        .unwrap_or(0);
    let (client, connection) =
        tokio_postgres::connect(&args.postgres, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!("VACUUM ANALYZE {schema}.audit_events"))
        .await?;
    let pg_bytes: i64 = client
        .query_one(
            &format!("SELECT pg_total_relation_size('{schema}.audit_events')"),
            &[],
        )
        .await?
        .get(0);

    println!(
        "caracal bench audit: {count} events over 4 zones, 32 concurrent producers; embedded = SQLite, \
         distributed = PostgreSQL (stream embedded in both)"
    );
    println!(
        "{:<44} {:>16} {:>16} {:>12} {:>10}",
        "case", "embedded", "distributed", "dist/emb", "target"
    );
    let print = |case: &str, embedded: f64, distributed: f64, target: &str| {
        println!(
            "{case:<44} {embedded:>16.0} {distributed:>16.0} {:>11.2}x {target:>10}",
            distributed / embedded.max(f64::MIN_POSITIVE)
        )
    };
    if let [(_, sqlite_ingest, sqlite_sweep), (_, pg_ingest, pg_sweep)] = results.as_slice() {
        print(
            "ingestion (events/s, stream to chain)",
            *sqlite_ingest,
            *pg_ingest,
            ">= 50000",
        );
        print(
            "sweep verification (events/s)",
            *sqlite_sweep,
            *pg_sweep,
            ">= 200000",
        );
    }
    print(
        "stored bytes per event (table + indexes)",
        sqlite_bytes as f64 / count as f64,
        pg_bytes as f64 / count as f64,
        "<= 600",
    );
    scratch.remove(&args.postgres).await;
    Ok(())
}
