//! `caracal bench coordinator`: revoking the root of a tree of sessions with delegation edges —
//! the cascade committed (every session terminated, every edge revoked, the epoch bumped, one
//! revocation message per session enqueued, in one transaction) and every message published
//! to the streams by the outbox dispatcher — embedded beside distributed, in one run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use caracal_bus::signature::StreamKey;
use caracal_bus::{EmbeddedBus, Producer, RedisBus, Streams};
use caracal_services::outbox::{Dispatcher, DispatcherConfig};
use caracal_store::{DelegationEdge, Session, Store};

use crate::bench::Scratch;
use crate::cli::BenchArgs;

/// Children per session; depth 3 below the root gives 1 + 10 + 100 + 1,000 sessions.
const FANOUT: usize = 10;

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let depth = if args.quick { 2 } else { 3 };
    let scratch = Scratch::create(args, "coordinator", 4).await?;
    let redis = RedisBus::connect(&args.redis)
        .await
        .with_context(|| format!("Redis at {}", caracal_store::redact_url(&args.redis)))?;
    println!(
        "caracal bench coordinator: terminate the root of a {FANOUT}-ary session tree, depth {depth}, \
         with an edge from every parent to each child; commit + publish every message; {} cores",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    // Steady state before timing: the WAL the tree's ~2,200 commits left is checkpointed (as
    // the database would have done by itself meanwhile), and PostgreSQL has statistics for the
    // freshly filled tables (as autovacuum would have gathered).
    let sqlite = scratch.sqlite.clone();
    let embedded = measure(
        Arc::new(scratch.sqlite.clone()),
        Arc::new(EmbeddedBus::new(scratch.sqlite.clone())),
        "zone-embedded",
        depth,
        async || {
            sqlite
                .run_alone(|connection| connection.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)"))
                .await?;
            Ok(())
        },
    )
    .await?;
    let postgres = scratch.postgres.clone();
    let distributed = measure(
        Arc::new(scratch.postgres.clone()),
        Arc::new(redis),
        &format!("zone-{}", scratch.run_id),
        depth,
        async || {
            caracal_store::db::Db::change(&postgres, "ANALYZE sessions", vec![]).await?;
            caracal_store::db::Db::change(&postgres, "ANALYZE delegation_edges", vec![]).await?;
            Ok(())
        },
    )
    .await?;
    println!("{:<44} {:>14} {:>14}", "", "embedded", "distributed");
    for (name, a, b) in [
        (
            "sessions terminated",
            embedded.sessions as f64,
            distributed.sessions as f64,
        ),
        (
            "edges revoked",
            embedded.edges as f64,
            distributed.edges as f64,
        ),
        (
            "messages published",
            embedded.messages as f64,
            distributed.messages as f64,
        ),
        ("commit, ms", ms(embedded.commit), ms(distributed.commit)),
        (
            "commit + every message published, ms",
            ms(embedded.total),
            ms(distributed.total),
        ),
    ] {
        println!("{name:<44} {a:>14.1} {b:>14.1}");
    }
    println!("target: commit + publish < 100 ms");
    scratch.remove(&args.postgres).await;
    Ok(())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

struct Measured {
    sessions: usize,
    edges: usize,
    messages: usize,
    commit: Duration,
    total: Duration,
}

fn session(zone: &str, id: String, parent: Option<String>, depth: i64) -> Session {
    let now = caracal_store::now_ms();
    Session {
        id,
        zone_id: zone.to_owned(),
        application_id: "bench-app".into(),
        parent_id: parent,
        authority_record_id: "bench-record".into(),
        status: "active".into(),
        lifecycle: "task".into(),
        depth,
        labels: Vec::new(),
        metadata: "{}".into(),
        ttl_seconds: Some(3600),
        lease_generation: 0,
        heartbeat_deadline_ms: None,
        started_at_ms: now,
        last_active_ms: now,
        terminated_at_ms: None,
        termination_reason: None,
    }
}

async fn measure(
    store: Arc<dyn Store>,
    streams: Arc<dyn Streams>,
    zone: &str,
    depth: usize,
    settle: impl AsyncFnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Measured> {
    // The tree, level by level, with an edge parent → child.
    let root = format!("{zone}-s");
    store
        .create_session(&session(zone, root.clone(), None, 0), &[])
        .await?;
    let mut level = vec![root.clone()];
    for generation in 1..=depth {
        let mut next = Vec::new();
        for parent in &level {
            for n in 0..FANOUT {
                let id = format!("{parent}-{n}");
                store
                    .create_session(
                        &session(zone, id.clone(), Some(parent.clone()), generation as i64),
                        &[],
                    )
                    .await?;
                store
                    .create_delegation_edge(
                        &DelegationEdge {
                            id: format!("e-{id}"),
                            zone_id: zone.to_owned(),
                            source_session_id: parent.clone(),
                            target_session_id: id.clone(),
                            issuer_application_id: "bench-app".into(),
                            receiver_application_id: "bench-app".into(),
                            parent_edge_id: None,
                            resource_id: None,
                            scopes: vec!["s".into()],
                            constraints: "{}".into(),
                            status: "active".into(),
                            expires_at_ms: Some(caracal_store::now_ms() + 3_600_000),
                            created_at_ms: caracal_store::now_ms(),
                            revoked_at_ms: None,
                        },
                        &[],
                    )
                    .await?;
                next.push(id);
            }
        }
        level = next;
    }
    // Publish what building the tree enqueued (edge-create epochs) before timing.
    let dispatcher = Dispatcher::new(
        Arc::clone(&store),
        Producer::new(streams, StreamKey::new(b"bench key")),
        DispatcherConfig::new(format!("bench-{zone}")),
        None,
    );
    while dispatcher.drain_once().await? > 0 {}
    settle().await?;

    let started = Instant::now();
    let tree = store
        .terminate_session_tree(
            zone,
            &root,
            "bench",
            caracal_services::coordinator::revocations,
        )
        .await?;
    let commit = started.elapsed();
    let mut messages = 0;
    loop {
        let sent = dispatcher.drain_once().await?;
        if sent == 0 {
            break;
        }
        messages += sent;
    }
    let total = started.elapsed();
    Ok(Measured {
        sessions: tree.sessions.len(),
        edges: tree.edges.len(),
        messages,
        commit,
        total,
    })
}
