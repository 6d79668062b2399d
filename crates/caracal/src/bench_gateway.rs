//! `caracal bench gateway`: a governed request beside a direct one, in one run. Direct: a GET
//! to a loopback upstream over a pooled keep-alive connection. Governed: a fresh delegated
//! `use=gateway` mint at the STS, then the Gateway call with it (verify, revocation check,
//! one-shot `jti`, re-exchange with policy and mint, credential injection, proxy over TCP to
//! the same upstream, audit event) — the STS and the Gateway in process, as `caracal up` runs
//! them, so the figures are their cost without the client's own socket. The nginx comparison,
//! open-loop latency and CPU accounting of issue 10 build on this.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use axum::body::Body;
use caracal_core::Role;
use caracal_services::RoleState;
use caracal_services::gateway::exchange::Exchanger;
use caracal_services::gateway::{Gateway, GatewayConfig};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use crate::bench_sts::{Figures, bench_stack, figures, mint_once};
use crate::cli::BenchArgs;

const CONCURRENCY: usize = 32;

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let count = if args.quick { 200 } else { args.messages };
    let upstream = crate::bench_governed::upstream().await?;
    let bench = bench_stack(&format!("http://{upstream}/api")).await?;
    let sts = bench.sts_router();
    let gateway = Arc::new(
        Gateway::new(
            GatewayConfig::new("http://127.0.0.1:1".into()),
            Exchanger::InProcess(bench.sts.clone()),
            Arc::default(),
        )
        .map_err(|error| anyhow::anyhow!(error))?,
    );
    gateway
        .revocations
        .reload(bench.shared.store.as_ref())
        .await?;
    // The revocation stream followed as in a running Gateway (its freshness needs it).
    let (stop_follower, stop) = tokio::sync::watch::channel(false);
    let follower = tokio::spawn(caracal_services::gateway::revocation::follow_stream(
        Arc::clone(&gateway.revocations),
        Arc::clone(&bench.shared.bus.streams),
        caracal_bus::signature::StreamKey::new(b"bench"),
        "bench".to_owned(),
        Arc::clone(&gateway.metrics),
        stop,
    ));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !gateway
        .revocations
        .is_fresh(std::time::Duration::from_secs(60), caracal_store::now_ms())
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the revocation stream was not followed within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut state = RoleState::new(Role::Gateway, bench.shared.clone());
    state.gateway = Some(Arc::clone(&gateway));
    let gateway_router = caracal_services::router(state);
    let delegated = bench.delegated_form();
    // Warm the caches (secret, keys, connections): steady state, not the first call.
    governed_once(&sts, &gateway_router, &delegated).await?;

    println!(
        "caracal bench gateway: {count} requests per case, {CONCURRENCY} in flight; embedded store \
         (SQLite, synchronous=FULL); loopback upstream; {} cores",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<hyper::body::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let url: hyper::Uri = format!("http://{upstream}/api/entries").parse()?;
    let direct = closed_loop("direct upstream", count, {
        let (client, url) = (client.clone(), url.clone());
        move || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let response = client.get(url).await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "upstream {}",
                    response.status()
                );
                response.into_body().collect().await?;
                Ok(())
            }
        }
    })
    .await?;
    let governed = closed_loop("governed (mint + gateway)", count, {
        let (sts, gateway_router, delegated) =
            (sts.clone(), gateway_router.clone(), delegated.clone());
        move || {
            let (sts, gateway_router, delegated) =
                (sts.clone(), gateway_router.clone(), delegated.clone());
            async move { governed_once(&sts, &gateway_router, &delegated).await }
        }
    })
    .await?;
    let mint_only = closed_loop("delegated mint alone", count, {
        let (sts, delegated) = (sts.clone(), delegated.clone());
        move || {
            let (sts, delegated) = (sts.clone(), delegated.clone());
            async move { mint_once(&sts, &delegated).await }
        }
    })
    .await?;
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>16}",
        "case", "req/s", "p50 ms", "p99 ms", "vs direct"
    );
    for row in [&direct, &mint_only, &governed] {
        println!(
            "{:<28} {:>10.0} {:>10.3} {:>10.3} {:>15.3}x",
            row.name,
            row.rate,
            row.p50.as_secs_f64() * 1000.0,
            row.p99.as_secs_f64() * 1000.0,
            row.rate / direct.rate.max(f64::EPSILON)
        );
    }
    let _ = stop_follower.send(true);
    let _ = follower.await;
    drop((sts, gateway_router, gateway));
    bench.evidence_tasks.shutdown().await;
    Ok(())
}

/// One governed request: a fresh gateway mandate, then the Gateway call with it.
async fn governed_once(
    sts: &axum::Router,
    gateway: &axum::Router,
    delegated: &str,
) -> anyhow::Result<()> {
    let minted = sts
        .clone()
        .oneshot(
            http::Request::post("/oauth/2/token")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Body::from(delegated.to_owned()))?,
        )
        .await?;
    anyhow::ensure!(minted.status().is_success(), "mint {}", minted.status());
    let body: serde_json::Value =
        serde_json::from_slice(&minted.into_body().collect().await?.to_bytes())?;
    let token = body
        .get("access_token")
        .and_then(serde_json::Value::as_str)
        .context("access_token")?;
    let response = gateway
        .clone()
        .oneshot(
            http::Request::get("/entries")
                .header("authorization", format!("Bearer {token}"))
                .header("x-caracal-resource", "resource://ledger")
                .body(Body::empty())?,
        )
        .await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "gateway {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    Ok(())
}

async fn closed_loop<F, Fut>(name: &'static str, count: usize, one: F) -> anyhow::Result<Figures>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (one, next) = (one.clone(), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let at = Instant::now();
                one().await?;
                latencies.push(at.elapsed());
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
