//! `caracal bench sts`: what a mint costs beyond its signature. Raw ES256 signing, full
//! bootstrap mints and full delegated mints, measured side by side in one run, the mints with
//! the embedded store in the loop (client authentication from the verified-secret cache, live
//! session and delegation reads, the policy decision, the authority record committed, the
//! audit event recorded). The mints go through the STS router in process (no socket), so the
//! figures are the STS's own cost; `caracal bench` (issue 10) adds the HTTP hops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::body::Body;
use caracal_bus::EmbeddedBus;
use caracal_core::Role;
use caracal_services::evidence::{Evidence, EvidenceConfig};
use caracal_services::{Bus, RoleState, Shared};
use caracal_store::{DelegationEdge, Session, SqliteStore, Store, TokenScope};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::cli::BenchArgs;

/// Requests in flight at once for the mint cases; the delegated mint also runs at
/// [`MORE_IN_FLIGHT`]: the more mints share each durable commit, the more commits a second
/// the disk can serve, so a case's peak is its best rate at either.
const CONCURRENCY: usize = 32;
const MORE_IN_FLIGHT: usize = 128;

pub(crate) struct Figures {
    pub name: &'static str,
    pub rate: f64,
    pub p50: Duration,
    pub p99: Duration,
}

/// An embedded stack with a provisioned zone and an STS, for the benchmarks that mint.
pub(crate) struct Bench {
    /// Holds the store (and the disk probe's file).
    pub directory: tempfile::TempDir,
    pub shared: Shared,
    pub sts: Arc<caracal_services::sts::Sts>,
    pub world: World,
    pub evidence_tasks: caracal_services::evidence::EvidenceTasks,
}

impl Bench {
    /// The STS router over this stack.
    pub fn sts_router(&self) -> axum::Router {
        let mut state = RoleState::new(Role::Sts, self.shared.clone());
        state.sts = Some(Arc::clone(&self.sts));
        caracal_services::router(state)
    }

    /// The form of a delegated mint along the provisioned edge.
    pub fn delegated_form(&self) -> String {
        form(
            &self.world,
            &[
                ("scope", "ledger:read"),
                ("agent_session_id", "bench-target"),
                ("delegation_edge_id", "bench-edge"),
            ],
        )
    }
}

pub(crate) async fn bench_stack(upstream_url: &str) -> anyhow::Result<Bench> {
    let directory = tempfile::tempdir()?;
    let sqlite = SqliteStore::open(&directory.path().join("bench.db"))?;
    let bus = Bus::embedded(EmbeddedBus::new(sqlite.clone()));
    let replay_dir = directory.path().join("audit-replay");
    let (evidence, evidence_tasks) = Evidence::start(
        caracal_bus::Producer::new(
            Arc::clone(&bus.streams),
            caracal_bus::signature::StreamKey::new(b"bench"),
        ),
        EvidenceConfig::new(replay_dir.clone()),
    )?;
    let store: Arc<dyn Store> = Arc::new(sqlite);
    let shared = Shared::new(
        Arc::clone(&store),
        bus,
        evidence,
        replay_dir,
        caracal_crypto::Kek::generate()?,
    );
    let world = provision(&shared, upstream_url).await?;
    let issuer = "http://127.0.0.1:8080".to_owned();
    let sts = Arc::new(
        caracal_services::sts::Sts::start(
            issuer,
            caracal_services::policy::PolicyCache::default(),
            Arc::clone(&store),
            &shared.kek,
        )
        // The benchmark mints far beyond one application's per-minute budget.
        .with_mint_limit(u64::MAX),
    );
    sts.policies.refresh_all(store.as_ref(), "bench").await?;
    Ok(Bench {
        directory,
        shared,
        sts,
        world,
        evidence_tasks,
    })
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let count = if args.quick { 300 } else { args.messages };
    let bench = bench_stack("http://127.0.0.1:9/api").await?;
    let app = bench.sts_router();
    let world = &bench.world;

    println!(
        "caracal bench sts: {count} operations per case, {CONCURRENCY} in flight (and \
         {MORE_IN_FLIGHT} for delegated mints); embedded store \
         (SQLite, synchronous=FULL) and in-process streams; {} cores",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let mut rows = vec![sign_rate(count).await?];
    let bootstrap = form(world, &[("scope", "agent:lifecycle")]);
    let delegated = bench.delegated_form();
    // Warm the verified-secret cache and the key cache: steady state, not the first call.
    mint_once(&app, &bootstrap).await?;
    mint_once(&app, &delegated).await?;
    rows.push(
        mints(
            &app,
            "bootstrap mint (use=session)",
            &bootstrap,
            count,
            CONCURRENCY,
        )
        .await?,
    );
    let delegated_rows = [
        ("delegated mint (use=gateway)", CONCURRENCY),
        ("delegated mint, 128 in flight", MORE_IN_FLIGHT),
    ];
    let mut peak: f64 = 1.0;
    for (name, in_flight) in delegated_rows {
        let row = mints(&app, name, &delegated, count, in_flight).await?;
        peak = peak.max(row.rate);
        rows.push(row);
    }
    // Latency without queueing: requests sent on a fixed schedule at half the delegated peak,
    // each timed from when it was due (no coordinated omission).
    let store_dir = bench.directory.path();
    let disk_idle = crate::bench_disk::idle(store_dir, if args.quick { 100 } else { 1000 })
        .context("measuring fdatasync")?;
    let disk_probe = crate::bench_disk::start(store_dir);
    rows.push(
        open_loop(
            &app,
            "delegated at half peak (open loop)",
            &delegated,
            count,
            peak / 2.0,
        )
        .await?,
    );
    let disk_loaded = disk_probe.finish().context("measuring fdatasync")?;

    let sign = rows.first().map_or(1.0, |row| row.rate);
    println!(
        "{:<32} {:>12} {:>10} {:>10} {:>14}",
        "case", "ops/s", "p50 ms", "p99 ms", "vs raw sign"
    );
    for row in &rows {
        println!(
            "{:<32} {:>12.0} {:>10.3} {:>10.3} {:>13.2}x",
            row.name,
            row.rate,
            row.p50.as_secs_f64() * 1000.0,
            row.p99.as_secs_f64() * 1000.0,
            row.rate / sign
        );
    }
    println!(
        "disk fdatasync (under every mint's audit commit): idle {disk_idle}; during the open loop {disk_loaded}"
    );
    drop(app);
    let Bench { evidence_tasks, .. } = bench;
    evidence_tasks.shutdown().await;
    Ok(())
}

/// Raw ES256 signatures over a mandate-sized message, one signer per core.
async fn sign_rate(count: usize) -> anyhow::Result<Figures> {
    let key = Arc::new(caracal_crypto::es256::SigningKey::generate()?);
    let workers = std::thread::available_parallelism().map_or(2, usize::from);
    let message = vec![b'x'; 700];
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let (key, message) = (Arc::clone(&key), message.clone());
        let share = count / workers + usize::from(worker < count % workers);
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut latencies = Vec::with_capacity(share);
            for _ in 0..share {
                let one = Instant::now();
                key.sign(&message)
                    .map_err(|error| anyhow::anyhow!("{error}"))?;
                latencies.push(one.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok(figures("raw ES256 sign", started.elapsed(), latencies))
}

async fn mints(
    app: &axum::Router,
    name: &'static str,
    body: &str,
    count: usize,
    in_flight: usize,
) -> anyhow::Result<Figures> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let (app, body, next) = (app.clone(), body.to_owned(), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                let one = Instant::now();
                mint_once(&app, &body).await?;
                latencies.push(one.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok(figures(name, started.elapsed(), latencies))
}

async fn open_loop(
    app: &axum::Router,
    name: &'static str,
    body: &str,
    count: usize,
    rate: f64,
) -> anyhow::Result<Figures> {
    // The schedule runs on its own thread: the runtime's timer ticks in milliseconds, which
    // would add up to a millisecond of start delay to every request; a thread sleep is
    // precise to tens of microseconds.
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let runtime = tokio::runtime::Handle::current();
    let (app, body) = (app.clone(), body.to_owned());
    let started = Instant::now();
    let scheduler = std::thread::spawn(move || {
        let mut tasks = Vec::with_capacity(count);
        for n in 0..count {
            let due = started + interval.mul_f64(n as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (app, body) = (app.clone(), body.clone());
            tasks.push(runtime.spawn(async move {
                mint_once(&app, &body).await?;
                anyhow::Ok(due.elapsed())
            }));
        }
        tasks
    });
    let tasks = tokio::task::spawn_blocking(move || scheduler.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the request scheduler panicked"))?;
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.push(task.await??);
    }
    let mut figures = figures(name, started.elapsed(), latencies);
    figures.rate = rate;
    Ok(figures)
}

/// The latency at `fraction` of `sorted` (zero when empty): every benchmark's percentiles.
pub(crate) fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 * fraction) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).copied().unwrap_or_default()
}

pub(crate) fn figures(
    name: &'static str,
    elapsed: Duration,
    mut latencies: Vec<Duration>,
) -> Figures {
    latencies.sort_unstable();
    let at = |fraction: f64| percentile(&latencies, fraction);
    Figures {
        name,
        rate: latencies.len() as f64 / elapsed.as_secs_f64().max(f64::EPSILON),
        p50: at(0.50),
        p99: at(0.99),
    }
}

pub(crate) async fn mint_once(app: &axum::Router, body: &str) -> anyhow::Result<()> {
    let response = app
        .clone()
        .oneshot(
            http::Request::post("/oauth/2/token")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Body::from(body.to_owned()))?,
        )
        .await?;
    let status = response.status();
    if !status.is_success() {
        let bytes = response.into_body().collect().await?.to_bytes();
        anyhow::bail!(
            "mint refused ({status}): {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    response.into_body().collect().await?;
    Ok(())
}

pub(crate) struct World {
    zone_id: String,
    app_id: String,
    secret: String,
}

fn form(world: &World, extra: &[(&str, &str)]) -> String {
    let mut fields = vec![
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("zone_id", world.zone_id.as_str()),
        ("application_id", world.app_id.as_str()),
        ("client_secret", world.secret.as_str()),
        ("resource", "resource://ledger"),
    ];
    fields.extend_from_slice(extra);
    fields
        .iter()
        .map(|(name, value)| {
            format!(
                "{name}={}",
                value
                    .replace(':', "%3A")
                    .replace(' ', "+")
                    .replace('/', "%2F")
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A zone, an application, a resource, grants (activated), two sessions and a delegation,
/// provisioned through the admin API as an operator would.
async fn provision(shared: &Shared, upstream_url: &str) -> anyhow::Result<World> {
    let token = caracal_crypto::AdminToken::generate()?;
    shared
        .store
        .insert_admin_token(
            &caracal_store::NewAdminToken {
                id: "bench".into(),
                name: "bench".into(),
                digest: token.digest(),
                scope: TokenScope::Global,
                capabilities: "read,write,approve".into(),
                created_by: "bench".into(),
            },
            &[],
        )
        .await?;
    let api = caracal_services::router(RoleState::new(Role::Api, shared.clone()));
    let bearer = token.expose().to_owned();
    let call = |path: String, body: Value| {
        let (api, bearer) = (api.clone(), bearer.clone());
        async move {
            let response = api
                .oneshot(
                    http::Request::post(path.as_str())
                        .header("authorization", format!("Bearer {bearer}"))
                        .header("content-type", "application/json")
                        .body(Body::from(body.to_string()))?,
                )
                .await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            let answer: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            anyhow::ensure!(status.is_success(), "{path}: {status} {answer}");
            anyhow::Ok(answer)
        }
    };
    let zone = call("/v1/zones".into(), json!({"name": "bench"})).await?;
    let zone_id = zone
        .get("id")
        .and_then(Value::as_str)
        .context("zone id")?
        .to_owned();
    let base = format!("/v1/zones/{zone_id}");
    let app = call(
        format!("{base}/applications"),
        json!({"name": "bench-agent", "registration_method": "managed"}),
    )
    .await?;
    let app_id = app
        .get("id")
        .and_then(Value::as_str)
        .context("app id")?
        .to_owned();
    let secret = app
        .get("client_secret")
        .and_then(Value::as_str)
        .context("secret")?
        .to_owned();
    let provider = call(
        format!("{base}/providers"),
        json!({"name": "mandate", "kind": "caracal_mandate"}),
    )
    .await?;
    call(
        format!("{base}/resources"),
        json!({"name": "Ledger", "identifier": "resource://ledger", "scopes": ["ledger:read"],
               "upstream_url": upstream_url, "credential_provider_id": provider.get("id"),
               "operations": [{"method": "GET", "path": "/entries", "scope": "ledger:read"}]}),
    )
    .await?;
    let document = format!(
        "# caracal:data-document\npackage caracal.authz\nimport rego.v1\napp_ids := {{\"bench\": \"{app_id}\"}}\ngrants := {{\"resource://ledger\": {{\"application\": \"bench\", \"roles\": {{\"{app_id}\": [\"ledger:read\"]}}}}}}\n"
    );
    let policy = call(
        format!("{base}/policies"),
        json!({"name": "grants", "content": document}),
    )
    .await?;
    let set = call(format!("{base}/policy-sets"), json!({"name": "main"})).await?;
    let sets = format!(
        "{base}/policy-sets/{}",
        set.get("id").and_then(Value::as_str).context("set id")?
    );
    let version = call(
        format!("{sets}/versions"),
        json!({"manifest": [{"policy_version_id": policy.get("version_id")}]}),
    )
    .await?;
    call(
        format!("{sets}/activate"),
        json!({"version_id": version.get("id")}),
    )
    .await?;

    let now = caracal_store::now_ms();
    for id in ["bench-source", "bench-target"] {
        shared
            .store
            .create_session(
                &Session {
                    id: id.into(),
                    zone_id: zone_id.clone(),
                    application_id: app_id.clone(),
                    parent_id: None,
                    authority_record_id: "bench".into(),
                    status: "active".into(),
                    lifecycle: "task".into(),
                    depth: 0,
                    labels: vec![app_id.clone()],
                    metadata: "{}".into(),
                    ttl_seconds: Some(86_400),
                    lease_generation: 1,
                    heartbeat_deadline_ms: None,
                    started_at_ms: now,
                    last_active_ms: now,
                    terminated_at_ms: None,
                    termination_reason: None,
                },
                &[],
            )
            .await?;
    }
    shared
        .store
        .create_delegation_edge(
            &DelegationEdge {
                id: "bench-edge".into(),
                zone_id: zone_id.clone(),
                source_session_id: "bench-source".into(),
                target_session_id: "bench-target".into(),
                issuer_application_id: app_id.clone(),
                receiver_application_id: app_id.clone(),
                parent_edge_id: None,
                resource_id: None,
                scopes: vec!["ledger:read".into()],
                constraints: "{}".into(),
                status: "active".into(),
                expires_at_ms: Some(now + 86_400_000),
                created_at_ms: now,
                revoked_at_ms: None,
            },
            &[],
        )
        .await?;
    Ok(World {
        zone_id,
        app_id,
        secret,
    })
}
