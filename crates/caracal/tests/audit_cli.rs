//! `caracal audit export | verify | public-key` against a real store.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod util;

use std::sync::Arc;

use caracal_audit::Event;
use caracal_services::ledger::ingest::chain_builder;
use caracal_services::ledger::sweep::{SweepMetrics, Sweeper};
use caracal_services::ledger::{INITIAL_CHAIN_KEY_ID, chain_key, checkpoint_signer};
use caracal_store::prelude::*;
use caracal_store::{SqliteStore, Store};
use util::{caracal, fresh_home, run};

/// A data directory whose store holds a checkpointed 6-row chain; returns the public key.
async fn ledger_home(home: &std::path::Path) -> String {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new().mode(0o700).create(home).unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&home.join("caracal.db")).unwrap());
    let kek = caracal_crypto::Kek::generate().unwrap();
    let events: Vec<Event> = (1..=6)
        .map(|n| Event {
            id: format!("ev-{n}"),
            zone_id: "zone-a".into(),
            event_type: "sts.exchange".into(),
            request_id: format!("req-{n}"),
            decision: "allow".into(),
            policy_set_id: None,
            policy_set_version_id: None,
            manifest_sha: None,
            evaluation_status: "complete".into(),
            determining_policies_json: serde_json::json!([]),
            diagnostics_json: serde_json::json!([]),
            metadata_json: serde_json::json!({"n": n}),
            occurred_at_ms: 1_760_000_000_000 + n,
        })
        .collect();
    let ids: Vec<String> = events.iter().map(|event| event.id.clone()).collect();
    store
        .append_audit_chain(
            "zone-a",
            &ids,
            chain_builder(chain_key(&kek, INITIAL_CHAIN_KEY_ID), events),
        )
        .await
        .unwrap();
    let signer = checkpoint_signer(store.as_ref(), &kek).await.unwrap();
    let public_key = signer.public_key_hex();
    let sweeper = Sweeper::new(
        Arc::clone(&store),
        kek.clone(),
        Arc::new(SweepMetrics::default()),
    )
    .with_checkpoints(signer);
    assert!(sweeper.full().await.unwrap().is_empty());
    public_key
}

#[tokio::test]
async fn export_then_verify_offline_and_refuse_a_tampered_copy() {
    let (parent, home) = fresh_home();
    let public_key = ledger_home(&home).await;

    let keys = run(caracal(&home).args(["audit", "public-key"]));
    assert!(keys.status.success());
    assert!(String::from_utf8_lossy(&keys.stdout).contains(&public_key));

    let bundle = parent.path().join("zone-a.jsonl");
    let export = run(caracal(&home)
        .args([
            "audit",
            "export",
            "--zone",
            "zone-a",
            "--from-seq",
            "2",
            "--out",
        ])
        .arg(&bundle));
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );

    let verify = run(caracal(&home)
        .args(["audit", "verify", "--public-key", &public_key])
        .arg(&bundle));
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{stdout}");
    assert!(stdout.contains("rows 2..=6 (5 rows)"), "{stdout}");

    let tampered = std::fs::read_to_string(&bundle)
        .unwrap()
        .replacen("req-3", "req-9", 1);
    std::fs::write(&bundle, tampered).unwrap();
    let verify = run(caracal(&home)
        .args(["audit", "verify", "--public-key", &public_key])
        .arg(&bundle));
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAILED: line 4 (row 3): the fields do not match the content hash"),
        "{stdout}"
    );

    // A time window: events that occurred from …003 (RFC 3339) until before …005 (epoch ms).
    let window = parent.path().join("window.jsonl");
    let export = run(caracal(&home)
        .args([
            "audit",
            "export",
            "--zone",
            "zone-a",
            "--from",
            "2025-10-09T08:53:20.003Z",
            "--to",
            "1760000000005",
            "--out",
        ])
        .arg(&window));
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let verify = run(caracal(&home)
        .args(["audit", "verify", "--public-key", &public_key])
        .arg(&window));
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("rows 3..=4 (2 rows)"),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let empty = run(caracal(&home).args([
        "audit",
        "export",
        "--zone",
        "zone-a",
        "--from",
        "2030-01-01T00:00:00Z",
    ]));
    assert_eq!(empty.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("has no events in that time range"));
    let bad =
        run(caracal(&home).args(["audit", "export", "--zone", "zone-a", "--from", "yesterday"]));
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("neither RFC 3339 nor epoch milliseconds")
    );

    for expected in ["chain-2", "chain-3"] {
        let rotated = run(caracal(&home).args(["audit", "rotate-key"]));
        assert!(rotated.status.success());
        assert!(
            String::from_utf8_lossy(&rotated.stdout)
                .contains(&format!("current audit chain key: {expected}"))
        );
    }

    let missing = run(caracal(&home).args(["audit", "export", "--zone", "zone-z"]));
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("has no signed checkpoint yet"));
}

#[tokio::test]
async fn ack_tamper_clears_the_audit_role_of_a_running_stack() {
    let (_parent, home) = fresh_home();
    let mut args = util::free_ports();
    args.push("up".to_owned());
    let running = util::Running::start(&home, &args);
    assert_eq!(util::wait_ready(running.address("audit")).status, 200);

    // A finding as the sweep would record it (a second connection to the running store).
    let store = SqliteStore::open(&home.join("caracal.db")).unwrap();
    store
        .record_tamper_findings(&[caracal_store::TamperFinding {
            zone_id: "zone-1".into(),
            seq: 3,
            kind: "sequence_gap".into(),
            detail: "sequence jumps from 2 to 4: 1 row(s) missing".into(),
            found_at_ms: 1,
            acknowledged_at_ms: None,
            acknowledged_by: None,
            ack_reason: None,
        }])
        .await
        .unwrap();
    let ready = util::get(running.address("audit"), "/ready", &[]);
    assert_eq!(ready.status, 503);
    assert!(
        ready.body.contains("audit_tamper_detected"),
        "{}",
        ready.body
    );

    let missing_reason = run(caracal(&home).args(["audit", "ack-tamper"]));
    assert_eq!(
        missing_reason.status.code(),
        Some(2),
        "--reason is required"
    );
    let ack = run(caracal(&home).args([
        "audit",
        "ack-tamper",
        "--reason",
        "row 3 restored from backup",
    ]));
    let stdout = String::from_utf8_lossy(&ack.stdout);
    assert!(
        ack.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ack.stderr)
    );
    assert!(stdout.contains("acknowledged 1 finding(s)"), "{stdout}");
    assert_eq!(util::wait_ready(running.address("audit")).status, 200);
    let (status, _, _) = running.terminate();
    assert!(status.success());
}
