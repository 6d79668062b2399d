//! `caracal bench hotpath`: the governed request's hot-path operations alone, each timed call
//! by call on one core — the policy decision, ES256 signing and verification, and the Gateway's
//! revocation lookup — so a regression in one shows without the HTTP and store noise. (A mint
//! with the store in the loop is `caracal bench sts`; audit append and chain verification are
//! `caracal bench audit`.)

use std::time::{Duration, Instant};

use caracal_services::gateway::revocation::{Anchors, RevocationView};
use caracal_store::RevokedAnchors;

use crate::cli::BenchArgs;

struct Row {
    name: &'static str,
    rate: f64,
    p50: Duration,
    p99: Duration,
    target: &'static str,
}

/// Calls `one` `count` times, timing each call.
fn timed(name: &'static str, target: &'static str, count: usize, mut one: impl FnMut()) -> Row {
    let mut latencies = Vec::with_capacity(count);
    let started = Instant::now();
    for _ in 0..count {
        let at = Instant::now();
        one();
        latencies.push(at.elapsed());
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let at = |fraction: f64| crate::bench_sts::percentile(&latencies, fraction);
    Row {
        name,
        rate: count as f64 / elapsed.as_secs_f64().max(f64::EPSILON),
        p50: at(0.50),
        p99: at(0.99),
        target,
    }
}

/// A zone's policy as the admin client writes it, with `resources` granted resources.
fn bundle(resources: usize) -> anyhow::Result<caracal_policy::Bundle> {
    let grants: Vec<String> = (0..resources)
        .map(|n| {
            format!(
                "\"resource://r{n}\": {{\"application\": \"billing\", \"roles\": {{\"app-1\": [\"ledger:read\", \"ledger:refund\"], \"clerk\": [\"ledger:read\"]}}}}"
            )
        })
        .collect();
    let document = format!(
        "# caracal:data-document\npackage caracal.authz\nimport rego.v1\napp_ids := {{\"billing\": \"app-1\"}}\ngrants := {{{}}}\n",
        // One grant a line: the compiler refuses lines over 1,024 columns.
        grants.join(",\n")
    );
    let compiled = caracal_policy::compile(&document).map_err(|diagnostics| {
        anyhow::anyhow!("the bench policy does not compile: {diagnostics:?}")
    })?;
    caracal_policy::Bundle::merge(&[compiled])
        .map_err(|diagnostics| anyhow::anyhow!("the bench policy does not merge: {diagnostics:?}"))
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let count = if args.quick {
        2_000
    } else {
        args.messages.max(1) * 10
    };
    let mut rows = Vec::new();

    let policy = bundle(200)?;
    let request = caracal_policy::Request {
        flow: caracal_policy::Flow::Mint,
        application_id: "app-1".into(),
        resource: "resource://r117".into(),
        scopes: vec!["ledger:read".into()],
        labels: vec!["app-1".into()],
        edge_scopes: Some(vec!["ledger:read".into()]),
        session: true,
        subject: false,
        target: vec![],
    };
    anyhow::ensure!(
        caracal_policy::decide(Some(&policy), &request).decision == caracal_policy::Verdict::Allow,
        "the bench request must be allowed"
    );
    rows.push(timed(
        "policy decision (200 grants)",
        "p50 < 20 µs",
        count,
        || {
            std::hint::black_box(caracal_policy::decide(
                Some(std::hint::black_box(&policy)),
                std::hint::black_box(&request),
            ));
        },
    ));

    // A mandate-sized message: header and claims of a delegated `use=gateway` mandate.
    let message = vec![b'a'; 620];
    let key = caracal_crypto::es256::SigningKey::generate()?;
    let signature = key.sign(&message)?;
    let public = key.public_key();
    anyhow::ensure!(
        public.verify(&message, &signature),
        "the signature verifies"
    );
    rows.push(timed("ES256 sign", "—", count, || {
        std::hint::black_box(key.sign(std::hint::black_box(&message)).ok());
    }));
    rows.push(timed("ES256 verify", "—", count, || {
        std::hint::black_box(public.verify(std::hint::black_box(&message), &signature));
    }));

    // The Gateway's view holding 100,000 revoked anchors of each kind.
    let view = RevocationView::default();
    let ids = |prefix: &str| (0..100_000).map(|n| format!("{prefix}-{n}")).collect();
    view.apply_snapshot(
        RevokedAnchors {
            records: ids("record"),
            sessions: ids("session"),
            edges: ids("edge"),
        },
        view.generation(),
    );
    let live = Anchors {
        sid: "record-live".into(),
        root_sid: "record-root-live".into(),
        agent_session_id: Some("session-live".into()),
        delegation_edge_id: Some("edge-live".into()),
    };
    anyhow::ensure!(!view.is_revoked(&live), "a live mandate is not revoked");
    rows.push(timed(
        "revocation lookup (300k marks)",
        "—",
        count,
        || {
            std::hint::black_box(view.is_revoked(std::hint::black_box(&live)));
        },
    ));

    println!(
        "{:<32} {:>12} {:>10} {:>10}  target",
        "case", "ops/s", "p50 µs", "p99 µs"
    );
    for row in &rows {
        println!(
            "{:<32} {:>12.0} {:>10.2} {:>10.2}  {}",
            row.name,
            row.rate,
            row.p50.as_secs_f64() * 1e6,
            row.p99.as_secs_f64() * 1e6,
            row.target
        );
    }
    Ok(())
}
