//! The published SDK (`caracalai-oauth`, `caracalai-identity`, `caracalai-verify` 1.0, Python)
//! against a running `caracal up`'s STS, unmodified: a bootstrap mint verified through the
//! zone's JWKS, a delegated mint along a live delegation, then `caracal keys rotate` and a
//! fresh verifier accepting the mandates signed before and after.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod util;

use std::path::Path;
use std::process::Command;

use caracal_store::prelude::*;
use serde_json::{Value, json};
use util::{Running, caracal, fresh_home, repo_root, sdk_python, wait_ready};

/// A port that was free a moment ago: the STS must listen where its issuer URL says.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `caracal [extra] up` with every role on a free port but the STS, which listens where its
/// issuer URL says.
fn up_with_sts_at(sts_port: u16, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = extra.iter().map(|arg| (*arg).to_owned()).collect();
    args.extend(
        util::ROLES
            .iter()
            .filter(|role| **role != "sts")
            .flat_map(|role| ["--port".to_owned(), format!("{role}=0")]),
    );
    args.extend([
        "--port".to_owned(),
        format!("sts={sts_port}"),
        "--issuer-url".to_owned(),
        format!("http://127.0.0.1:{sts_port}"),
        "up".to_owned(),
    ]);
    args
}

fn phase(
    python: &Path,
    running: &Running,
    env: &[(&str, String)],
    name: &str,
    state: &Value,
) -> Value {
    let output = Command::new(python)
        .arg(repo_root().join("crates/caracal/tests/interop/sts_client.py"))
        .arg(name)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("CARACAL_TEST_STATE", state.to_string())
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "phase {name} failed (server home {}):\n{}",
        running.home.display(),
        String::from_utf8_lossy(&output.stderr),
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn session(zone_id: &str, app_id: &str, id: &str) -> caracal_store::Session {
    let now = caracal_store::now_ms();
    caracal_store::Session {
        id: id.to_owned(),
        zone_id: zone_id.to_owned(),
        application_id: app_id.to_owned(),
        parent_id: None,
        authority_record_id: "interop".to_owned(),
        status: "active".to_owned(),
        lifecycle: "task".to_owned(),
        depth: 0,
        labels: vec![app_id.to_owned()],
        metadata: "{}".to_owned(),
        ttl_seconds: Some(3600),
        lease_generation: 1,
        heartbeat_deadline_ms: None,
        started_at_ms: now,
        last_active_ms: now,
        terminated_at_ms: None,
        termination_reason: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_published_sdk_mints_verifies_and_survives_a_key_rotation() {
    let python = sdk_python();
    let (_parent, home) = fresh_home();
    let sts_port = free_port();
    let running = Running::start(&home, &up_with_sts_at(sts_port, &[]));
    let api = running.address("api");
    assert_eq!(wait_ready(api).status, 200);
    assert_eq!(wait_ready(running.address("sts")).status, 200);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let env = [
        ("CARACAL_API_URL", format!("http://{api}")),
        ("CARACAL_ADMIN_TOKEN", token.trim().to_owned()),
        ("CARACAL_STS_URL", format!("http://127.0.0.1:{sts_port}")),
    ];

    let setup = phase(&python, &running, &env, "setup", &json!({}));
    assert_eq!(
        setup["bootstrap_claims"],
        json!({"use": "session", "scope": "agent:lifecycle", "target": ["resource://ledger"], "sub_type": "application"})
    );
    assert_eq!(setup["bootstrap_verified"]["ok"], true, "{setup}");
    assert_eq!(setup["bootstrap_verified"]["use"], "session");
    assert_eq!(setup["bad_secret"], json!(["AccessDenied", 401]));
    let mut state = setup["state"].clone();
    let (zone_id, app_id) = (
        state["zone_id"].as_str().unwrap().to_owned(),
        state["app_id"].as_str().unwrap().to_owned(),
    );

    // Sessions and a delegation between them, written to the store the way the Coordinator
    // will (WAL lets this second connection write beside the running server).
    let store = caracal_store::SqliteStore::open(&home.join("caracal.db")).unwrap();
    for id in ["interop-source", "interop-target"] {
        store
            .create_session(&session(&zone_id, &app_id, id), &[])
            .await
            .unwrap();
    }
    store
        .create_delegation_edge(
            &caracal_store::DelegationEdge {
                id: "interop-edge".to_owned(),
                zone_id: zone_id.clone(),
                source_session_id: "interop-source".to_owned(),
                target_session_id: "interop-target".to_owned(),
                issuer_application_id: app_id.clone(),
                receiver_application_id: app_id.clone(),
                parent_edge_id: None,
                resource_id: None,
                scopes: vec!["ledger:read".to_owned()],
                constraints: "{}".to_owned(),
                status: "active".to_owned(),
                expires_at_ms: Some(caracal_store::now_ms() + 600_000),
                created_at_ms: caracal_store::now_ms(),
                revoked_at_ms: None,
            },
            &[],
        )
        .await
        .unwrap();
    state["session_id"] = "interop-target".into();
    state["delegation_id"] = "interop-edge".into();
    let minted = phase(&python, &running, &env, "mint", &state);
    assert_eq!(
        minted["delegated"],
        json!({"use": "gateway", "scope": "ledger:read", "agent_session_id": "interop-target",
               "delegation_edge_id": "interop-edge", "hop_count": 1, "delegation_path": ["interop-edge"]})
    );
    assert_eq!(minted["delegated_chain_apps"], json!([app_id, app_id]));

    let rotated = caracal(&home)
        .args([
            "keys",
            "rotate",
            "--zone",
            &zone_id,
            "--reason",
            "interop test",
        ])
        .output()
        .unwrap();
    assert!(
        rotated.status.success(),
        "{}{}",
        String::from_utf8_lossy(&rotated.stdout),
        String::from_utf8_lossy(&rotated.stderr)
    );
    // The STS replica drops its cached keys when `caracal.keys.invalidate` arrives through the
    // outbox; give it a moment.
    let mut verified = Value::Null;
    for _ in 0..50 {
        verified = phase(&python, &running, &env, "verify", &state);
        if verified["kids"][0] != verified["kids"][1] {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_ne!(
        verified["kids"][0], verified["kids"][1],
        "the new key signs: {verified}"
    );
    assert_eq!(verified["before_verified"]["ok"], true, "{verified}");
    assert_eq!(verified["after_verified"]["ok"], true, "{verified}");

    let (exit, _, server_log) = running.terminate();
    assert!(exit.success(), "{server_log}");
}

/// With the Redis bus, so the published Redis revocation consumer sees what the Coordinator
/// publishes. Redis at 127.0.0.1:6379 is required.
#[test]
fn the_published_sdk_starts_sessions_delegates_narrowly_and_revocation_stops_the_child() {
    let (_parent, home) = fresh_home();
    let sts_port = free_port();
    let running = Running::start(
        &home,
        &up_with_sts_at(sts_port, &["--bus", "redis://127.0.0.1:6379"]),
    );
    let api = running.address("api");
    assert_eq!(wait_ready(api).status, 200);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let stream_key = std::fs::read_to_string(home.join("stream-key")).unwrap();
    let coordinator = running.address("coordinator");
    let seen = running.run_sdk_client(
        "coordinator_client.py",
        &[
            ("CARACAL_REDIS_URL", "redis://127.0.0.1:6379".to_owned()),
            ("CARACAL_STREAM_KEY_HEX", stream_key.trim().to_owned()),
            ("CARACAL_API_URL", format!("http://{api}")),
            ("CARACAL_ADMIN_TOKEN", token.trim().to_owned()),
            ("CARACAL_STS_URL", format!("http://127.0.0.1:{sts_port}")),
            ("CARACAL_COORDINATOR_URL", format!("http://{coordinator}")),
        ],
    );
    assert_eq!(seen["parent_started"], true);
    assert_eq!(seen["delegation_scopes"], json!(["ledger:read"]));
    assert_eq!(seen["child_mint"], json!({"use": "gateway", "edge": true}));
    assert_eq!(seen["wider_mint"], "access_denied", "{seen}");
    assert_eq!(
        seen["operator"],
        json!({"get": true, "children": true, "effective": true, "active": true,
            "traverse": true, "impact": true, "suspend": "suspended", "resume": "active",
            "terminate": "terminated"}),
        "the admin client's coordinator calls, with an admin token"
    );
    assert_eq!(seen["accepted"], true, "accept_delegation(validate=True)");
    assert_eq!(
        seen["inherited"],
        json!({"own_edge": true, "minted_along_it": true}),
        "a session started under a delegated one inherits the delegation"
    );
    assert_eq!(seen["foreign_accepted"], false);
    assert_eq!(seen["after_revoke"], "access_denied", "{seen}");
    assert_eq!(seen["revoked_before"], false);
    assert_eq!(
        seen["revoked_in_redis"],
        json!({"session": true, "delegation": true}),
        "the Redis revocation consumer marks the child's anchors"
    );
}

/// `Caracal.fetch` through the Gateway (STS in the same process, embedded bus) to a loopback
/// upstream behind a `caracal_mandate` provider, which verifies what it receives with
/// `caracalai_verify`.
#[test]
fn the_published_sdk_fetches_through_the_gateway_and_the_upstream_verifies_the_mandate() {
    let (_parent, home) = fresh_home();
    let sts_port = free_port();
    let running = Running::start(&home, &up_with_sts_at(sts_port, &[]));
    let api = running.address("api");
    assert_eq!(wait_ready(api).status, 200);
    assert_eq!(wait_ready(running.address("gateway")).status, 200);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let (coordinator, gateway) = (running.address("coordinator"), running.address("gateway"));
    let seen = running.run_sdk_client(
        "gateway_client.py",
        &[
            ("CARACAL_API_URL", format!("http://{api}")),
            ("CARACAL_ADMIN_TOKEN", token.trim().to_owned()),
            ("CARACAL_STS_URL", format!("http://127.0.0.1:{sts_port}")),
            ("CARACAL_COORDINATOR_URL", format!("http://{coordinator}")),
            ("CARACAL_GATEWAY_URL", format!("http://{gateway}")),
        ],
    );
    assert_eq!(seen["status"], 200, "{seen}");
    assert_eq!(seen["body"], json!({"entries": [1, 2, 3]}));
    assert_eq!(seen["upstream_path"], "/api/entries");
    assert_eq!(
        seen["upstream_verified"],
        json!({"ok": true, "use": "resource"}),
        "{seen}"
    );
    assert_eq!(seen["caracal_headers_upstream"], json!([]));
    assert_eq!(
        seen["undeclared"],
        json!([403, "operation_not_permitted"]),
        "{seen}"
    );
    assert_ne!(seen["after_revoke"][0], 200, "{seen}");
    assert_eq!(
        seen["upstream_calls"], 1,
        "only the permitted call reached it"
    );
}
