//! `caracal bench revocation`: how long a revocation takes to reach every Gateway replica.
//! PostgreSQL and Redis, one process serving the API, STS, Coordinator and Audit, and two
//! Gateway replicas of their own. Each run delegates afresh, checks both replicas let a call
//! through, terminates the delegation's target session, and then calls each replica with fresh
//! mandates of that session until the replica's own revocation view refuses one (401 `session
//! revoked`; a refusal by the STS's live check does not count). The time from the terminate call
//! to that refusal, p50 and p99 over the runs, per replica and for both.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use hyper::body::Bytes;
use serde_json::Value;

use crate::agent::Agent;
use crate::bench_governed::{
    Admin, Http, RESOURCE, get, mint, provision, spawn_caracal, upstream, wait_ready,
};
use crate::bench_sts::percentile;
use crate::cli::BenchArgs;

/// Mandates minted for each replica per run: calls until its view refuses.
const TRIES: usize = 60;
/// The Redis database the benchmark empties and uses, apart from anything else.
const REDIS_DB: u8 = 15;

/// Calls `gateway` with one mandate after another until its revocation view refuses one; the
/// time since `from`.
async fn until_refused(
    http: &Http,
    gateway: SocketAddr,
    mandates: &[String],
    from: Instant,
) -> anyhow::Result<Duration> {
    for mandate in mandates {
        let bearer = format!("Bearer {mandate}");
        let (status, body) = get(
            http,
            gateway,
            "/entries",
            &[("authorization", &bearer), ("x-caracal-resource", RESOURCE)],
        )
        .await?;
        let refused_by_view = status == 401
            && serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|body| body.get("error_description")?.as_str().map(str::to_owned))
                .is_some_and(|description| description == "session revoked");
        if refused_by_view {
            return Ok(from.elapsed());
        }
    }
    anyhow::bail!(
        "the Gateway at {gateway} did not refuse from its revocation view within {TRIES} calls"
    )
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let runs = if args.quick {
        3
    } else {
        (args.messages / 1000).clamp(5, 100)
    };
    let http: Http =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let redis_url = format!("{}/{REDIS_DB}", args.redis.trim_end_matches('/'));
    {
        let client = redis::Client::open(redis_url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let _: () = redis::cmd("FLUSHDB").query_async(&mut connection).await?;
    }
    let scratch = crate::bench::Scratch::create(args, "revocation", 1).await?;
    let result = measure(&http, args, &redis_url, &scratch.schema, runs).await;
    scratch.remove(&args.postgres).await;
    result
}

async fn measure(
    http: &Http,
    args: &BenchArgs,
    redis_url: &str,
    schema: &str,
    runs: usize,
) -> anyhow::Result<()> {
    let upstream = upstream().await?;
    let dir = tempfile::tempdir()?;
    let stream_key = caracal_crypto::hex(&caracal_crypto::random_bytes::<32>()?);
    let shared = |roles: &[&str], extra: &[String]| {
        let mut args: Vec<String> = [
            "--store",
            args.postgres.as_str(),
            "--store-schema",
            schema,
            "--bus",
            redis_url,
            "--stream-key",
            &stream_key,
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        args.extend(extra.iter().cloned());
        args.push("serve".to_owned());
        args.extend(roles.iter().map(|role| (*role).to_owned()));
        args
    };
    let control_home = dir.path().join("control");
    let mut control = spawn_caracal(
        &control_home,
        &shared(&["api", "sts", "coordinator", "audit"], &[]),
    )?;
    let roles = wait_ready(http, &control_home, &mut control).await?;
    let role = |name: &str| {
        roles
            .get(name)
            .copied()
            .with_context(|| format!("no {name} role"))
    };
    let (api, sts, coordinator) = (role("api")?, role("sts")?, role("coordinator")?);
    let mut replicas = Vec::new();
    for name in ["gateway-a", "gateway-b"] {
        let home = dir.path().join(name);
        std::fs::create_dir(&home)?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))?;
        }
        std::fs::copy(control_home.join("kek"), home.join("kek"))?;
        let extra = ["--gateway-sts-url".to_owned(), format!("http://{sts}")];
        let mut replica = spawn_caracal(&home, &shared(&["gateway"], &extra))?;
        let addresses = wait_ready(http, &home, &mut replica).await?;
        let gateway = addresses
            .get("gateway")
            .copied()
            .context("no gateway role")?;
        replicas.push((name, gateway, replica));
    }
    let token = std::fs::read_to_string(control_home.join(caracal_store::ADMIN_TOKEN_FILE))?;
    let admin = Admin {
        http,
        api,
        bearer: format!("Bearer {}", token.trim()),
    };
    let (zone, app, secret) = provision(&admin, upstream).await?;
    let agent = Agent {
        sts,
        coordinator,
        zone: &zone,
        app: &app,
        secret: &secret,
        resource: RESOURCE,
    };

    let progress = indicatif::ProgressBar::new(runs as u64);
    let mut per_replica: Vec<Vec<Duration>> = vec![Vec::new(); replicas.len()];
    let mut both = Vec::with_capacity(runs);
    for _ in 0..runs {
        let delegation = agent
            .delegate("ledger:read", "caracal bench revocation")
            .await?;
        let form = Bytes::from(agent.delegated_form(&delegation));
        let mut mandates = Vec::new();
        for (_, gateway, _) in &replicas {
            // One call each proves the replica lets the session through before it ends.
            let bearer = format!("Bearer {}", mint(http, sts, &form).await?);
            let (status, body) = get(
                http,
                *gateway,
                "/entries",
                &[("authorization", &bearer), ("x-caracal-resource", RESOURCE)],
            )
            .await?;
            ensure!(
                status == 200,
                "{gateway} refused a live session: {status} {}",
                String::from_utf8_lossy(&body)
            );
            let mut own = Vec::with_capacity(TRIES);
            for _ in 0..TRIES {
                own.push(mint(http, sts, &form).await?);
            }
            mandates.push(own);
        }
        let started = Instant::now();
        agent
            .terminate(&delegation.lifecycle, &delegation.target)
            .await?;
        let [(_, first, _), (_, second, _)] = &replicas[..] else {
            anyhow::bail!("two replicas are measured");
        };
        let (Some(first_mandates), Some(second_mandates)) = (mandates.first(), mandates.get(1))
        else {
            anyhow::bail!("mandates for both replicas");
        };
        // Both replicas probed at once: each wait runs from the same terminate call.
        let (a, b) = tokio::join!(
            until_refused(http, *first, first_mandates, started),
            until_refused(http, *second, second_mandates, started)
        );
        let (a, b) = (a?, b?);
        let slowest = a.max(b);
        for (samples, wait) in per_replica.iter_mut().zip([a, b]) {
            samples.push(wait);
        }
        both.push(slowest);
        let _ = agent
            .terminate(&delegation.lifecycle, &delegation.source)
            .await;
        progress.inc(1);
    }
    progress.finish_and_clear();

    println!(
        "{:<36} {:>6} {:>10} {:>10} {:>10}",
        "revocation visible at", "runs", "p50 ms", "p99 ms", "max ms"
    );
    let mut rows: Vec<(String, Vec<Duration>)> = replicas
        .iter()
        .zip(per_replica)
        .map(|((name, _, _), samples)| ((*name).to_owned(), samples))
        .collect();
    rows.push(("both replicas (the later of the two)".to_owned(), both));
    for (name, mut samples) in rows {
        samples.sort_unstable();
        let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
        println!(
            "{:<36} {:>6} {:>10.1} {:>10.1} {:>10.1}",
            name,
            samples.len(),
            ms(percentile(&samples, 0.50)),
            ms(percentile(&samples, 0.99)),
            ms(samples.last().copied().unwrap_or_default()),
        );
    }
    println!("target: p99 < 100 ms at both replicas");
    drop(replicas);
    drop(control);
    Ok(())
}
