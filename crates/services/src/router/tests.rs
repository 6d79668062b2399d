use axum::body::Body;
use std::sync::Arc;

use caracal_bus::EmbeddedBus;
use caracal_core::Role;
use caracal_store::SqliteStore;
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use super::router;
use crate::state::{Bus, RoleState};
use crate::test_support::{call, role_state, shared_with_bus, token};
use crate::wire::{ErrorBody, ReadyBody};

struct Answer {
    status: StatusCode,
    request_id: String,
    body: String,
}

async fn send(app: &axum::Router, path: &str, request_id: Option<&str>) -> Answer {
    let mut request = Request::get(path);
    if let Some(request_id) = request_id {
        request = request.header("x-request-id", request_id);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        request_id,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

#[tokio::test]
async fn health_and_ready_answer_with_a_generated_request_id() {
    let (_directory, state) = role_state(Role::Api);
    let app = router(state);
    let health = send(&app, "/health", None).await;
    assert_eq!(health.status, StatusCode::OK);
    let generated = uuid::Uuid::parse_str(&health.request_id).unwrap();
    assert_eq!(generated.get_version_num(), 7);

    let ready = send(&app, "/ready", None).await;
    assert_eq!(ready.status, StatusCode::OK);
    let body: ReadyBody = serde_json::from_str(&ready.body).unwrap();
    assert_eq!(body.status, "ready");
    assert_eq!(body.reason, None);
    let names: Vec<&str> = body
        .checks
        .iter()
        .map(|check| check.name.as_str())
        .collect();
    assert_eq!(names, ["shutdown", "store", "bus", "evidence", "outbox"]);
}

#[tokio::test]
async fn draining_makes_ready_fail_closed_with_a_reason() {
    let (_directory, state) = role_state(Role::Gateway);
    state.shared.start_draining();
    let ready = send(&router(state), "/ready", None).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let body: ReadyBody = serde_json::from_str(&ready.body).unwrap();
    assert_eq!(
        (body.status.as_str(), body.reason.as_deref()),
        ("not_ready", Some("draining"))
    );
    assert!(
        body.checks
            .iter()
            .any(|check| check.name == "shutdown" && !check.ok)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readiness_probes_do_not_trip_over_each_other() {
    let (_directory, state) = role_state(Role::Sts);
    let app = router(state);
    let probes: Vec<_> = (0..32)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, "/ready", None).await.status })
        })
        .collect();
    for probe in probes {
        assert_eq!(probe.await.unwrap(), StatusCode::OK);
    }
}

#[tokio::test]
async fn every_v1_route_refuses_bodies_over_256_kib() {
    let (_directory, state) = role_state(Role::Api);
    let writer = token(&state.shared, "write", caracal_store::TokenScope::Global).await;
    let app = router(state);
    let oversize = format!(r#"{{"reason":"{}"}}"#, "x".repeat(300 * 1024));
    for path in ["/v1/audit/tamper/ack", "/v1/zones"] {
        let (status, _, body) = call(&app, "POST", path, Some(&writer), &oversize).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")),
            "{path}"
        );
    }
}

#[tokio::test]
async fn every_v1_answer_is_marked_not_to_be_cached_or_sniffed() {
    let (_directory, state) = role_state(Role::Api);
    let writer = token(&state.shared, "write", caracal_store::TokenScope::Global).await;
    let app = router(state);
    for (method, path, bearer, body, status) in [
        (
            "POST",
            "/v1/zones",
            Some(&writer),
            r#"{"name":"z"}"#,
            StatusCode::CREATED,
        ),
        ("GET", "/v1/zones", Some(&writer), "", StatusCode::OK),
        ("GET", "/v1/zones", None, "", StatusCode::UNAUTHORIZED),
    ] {
        let (got, headers, _) = call(&app, method, path, bearer.map(String::as_str), body).await;
        assert_eq!(got, status, "{method} {path}");
        assert_eq!(headers["cache-control"], "no-store", "{method} {path}");
        assert_eq!(
            headers["x-content-type-options"], "nosniff",
            "{method} {path}"
        );
        assert_eq!(headers["referrer-policy"], "no-referrer", "{method} {path}");
    }
}

#[tokio::test]
async fn a_draining_api_refuses_new_v1_work() {
    let (_directory, state) = role_state(Role::Api);
    let writer = token(&state.shared, "write", caracal_store::TokenScope::Global).await;
    let app = router(state.clone());
    let (status, _, _) = call(&app, "GET", "/v1/zones", Some(&writer), "").await;
    assert_eq!(status, StatusCode::OK);
    state.shared.start_draining();
    let (status, headers, body) = call(
        &app,
        "POST",
        "/v1/zones",
        Some(&writer),
        r#"{"name":"late"}"#,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("draining"))
    );
    assert_eq!(headers["retry-after"], "1");
    assert!(
        state.shared.store.list_zones().await.unwrap().is_empty(),
        "nothing was created"
    );
}

#[tokio::test]
async fn inbound_request_ids_are_echoed_only_when_well_formed() {
    let (_directory, state) = role_state(Role::Sts);
    let app = router(state);
    assert_eq!(
        send(&app, "/health", Some("req-42")).await.request_id,
        "req-42"
    );
    let replaced = send(&app, "/health", Some(&"x".repeat(129)))
        .await
        .request_id;
    assert!(uuid::Uuid::parse_str(&replaced).is_ok(), "{replaced}");
}

#[tokio::test]
async fn a_configured_metrics_bearer_guards_metrics_and_nothing_else() {
    let (_directory, mut state) = role_state(Role::Gateway);
    state.shared.metrics_bearer = Some("a-metrics-bearer-token".into());
    let app = router(state);
    for (bearer, status) in [
        (None, StatusCode::UNAUTHORIZED),
        (
            Some("Bearer wrong-metrics-bearer-x"),
            StatusCode::UNAUTHORIZED,
        ),
        (Some("a-metrics-bearer-token"), StatusCode::UNAUTHORIZED),
        (Some("Bearer a-metrics-bearer-token"), StatusCode::OK),
    ] {
        let mut request = Request::get("/metrics");
        if let Some(bearer) = bearer {
            request = request.header("authorization", bearer);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{bearer:?}");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        if status == StatusCode::OK {
            assert!(text.contains("caracal_gateway_"), "{text}");
        } else {
            let body: ErrorBody = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body.error, "invalid_token");
        }
    }
    assert_eq!(send(&app, "/health", None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let (_directory, state) = role_state(Role::Audit);
    let app = router(state);
    let missing = send(&app, "/nope", Some("r1")).await;
    assert_eq!(
        (missing.status, missing.request_id.as_str()),
        (StatusCode::NOT_FOUND, "r1")
    );
    let body: ErrorBody = serde_json::from_str(&missing.body).unwrap();
    assert_eq!(body.error, "not_found");

    let response = app
        .oneshot(Request::post("/health").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: ErrorBody = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body.error, "method_not_allowed");
}

#[tokio::test]
async fn metrics_carry_only_the_role_prefix_and_count_by_route_template() {
    let (_directory, state) = role_state(Role::Coordinator);
    let app = router(state);
    send(&app, "/health", None).await;
    send(&app, "/no/such/path/123", None).await;
    let metrics = send(&app, "/metrics", None).await;
    assert_eq!(metrics.status, StatusCode::OK);
    for line in metrics.body.lines().filter(|line| !line.starts_with('#')) {
        assert!(line.starts_with("caracal_coordinator_"), "{line}");
    }
    assert!(
        metrics
            .body
            .contains(r#"caracal_coordinator_http_requests_total{route="/health",method="GET",status="200"} 1"#),
        "{}",
        metrics.body
    );
    assert!(metrics.body.contains(r#"route="unmatched""#));
    assert!(!metrics.body.contains("/no/such/path"));
}

#[tokio::test]
async fn a_dead_outbox_row_makes_the_api_role_not_ready() {
    let (_directory, state) = role_state(Role::Api);
    let app = router(state.clone());
    assert_eq!(send(&app, "/ready", None).await.status, StatusCode::OK);
    let message = caracal_store::OutboxMessage {
        stream: "caracal.sessions.revoke".into(),
        fields: Default::default(),
        dedupe_key: None,
    };
    let zone = caracal_store::NewZone {
        id: "z".into(),
        name: "z".into(),
        slug: "z".into(),
    };
    state
        .shared
        .store
        .create_zone(&zone, &[message])
        .await
        .unwrap();
    let row = state
        .shared
        .store
        .claim_outbox("t", 1, std::time::Duration::from_secs(1))
        .await
        .unwrap();
    state
        .shared
        .store
        .outbox_failed(row[0].id, "bus down", std::time::Duration::ZERO, 1)
        .await
        .unwrap();
    let ready = send(&app, "/ready", None).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let body: ReadyBody = serde_json::from_str(&ready.body).unwrap();
    assert_eq!(body.reason.as_deref(), Some("outbox_dead"));
    // Other roles do not own the outbox and stay ready.
    let (_other_directory, gateway) = role_state(Role::Gateway);
    assert_eq!(
        send(&router(gateway), "/ready", None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_unreachable_bus_makes_every_role_not_ready() {
    let directory = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
    let down = Arc::new(crate::test_support::DownBus);
    let bus = Bus {
        streams: down.clone(),
        replay: Arc::new(EmbeddedBus::new(store.clone())),
        rates: Arc::new(EmbeddedBus::new(store.clone())),
    };
    let (_keep, shared) = shared_with_bus(directory, store, bus);
    for role in Role::ALL {
        let ready = send(
            &router(RoleState::new(role, shared.clone())),
            "/ready",
            None,
        )
        .await;
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{role}");
        let body: ReadyBody = serde_json::from_str(&ready.body).unwrap();
        assert_eq!(body.reason.as_deref(), Some("bus_unreachable"), "{role}");
    }
}

#[tokio::test]
async fn lost_evidence_or_nowhere_to_spill_it_makes_roles_not_ready() {
    let directory = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
    let bus = Bus {
        streams: Arc::new(crate::test_support::DownBus),
        replay: Arc::new(EmbeddedBus::new(store.clone())),
        rates: Arc::new(EmbeddedBus::new(store.clone())),
    };
    let (_keep, shared) = shared_with_bus(directory, store, bus);
    let evidence_reason = |body: &ReadyBody| {
        body.checks
            .iter()
            .find(|check| check.name == "evidence")
            .and_then(|check| check.reason.clone())
    };
    let app = router(RoleState::new(Role::Sts, shared.clone()));

    // The replay directory is gone: nowhere to put evidence while the bus is down.
    std::fs::remove_dir_all(&shared.replay_dir).unwrap();
    std::fs::write(&shared.replay_dir, "blocked").unwrap();
    let body: ReadyBody = serde_json::from_str(&send(&app, "/ready", None).await.body).unwrap();
    assert_eq!(
        evidence_reason(&body).as_deref(),
        Some("audit_replay_unavailable")
    );

    // With the bus down and no replay file, recording loses evidence and the latch holds.
    let event = caracal_audit::Event {
        id: "ev-1".into(),
        zone_id: "zone-1".into(),
        event_type: "sts.exchange".into(),
        request_id: "req-1".into(),
        decision: "allow".into(),
        policy_set_id: None,
        policy_set_version_id: None,
        manifest_sha: None,
        evaluation_status: "complete".into(),
        determining_policies_json: serde_json::json!([]),
        diagnostics_json: serde_json::json!([]),
        metadata_json: serde_json::json!({}),
        occurred_at_ms: 1,
    };
    assert_eq!(
        shared.evidence.record(event).await,
        Err(crate::evidence::EvidenceError::Lost)
    );
    for role in Role::ALL {
        let ready = send(
            &router(RoleState::new(role, shared.clone())),
            "/ready",
            None,
        )
        .await;
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
        let body: ReadyBody = serde_json::from_str(&ready.body).unwrap();
        assert_eq!(
            evidence_reason(&body).as_deref(),
            Some("audit_evidence_lost"),
            "{role}"
        );
    }
    let metrics = send(&app, "/metrics", None).await.body;
    assert!(
        metrics.contains("caracal_sts_audit_evidence_lost_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn admin_tokens_gate_the_v1_routes_by_capability_and_zone() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let app = router(state);
    use caracal_store::TokenScope;
    let read = token(&shared, "read", TokenScope::Global).await;
    let zoned = token(&shared, "write", TokenScope::Zone("zone-1".into())).await;
    let cases: &[(&str, Option<&str>, &str, StatusCode, &str)] = &[
        (
            "GET",
            None,
            "",
            StatusCode::UNAUTHORIZED,
            "invalid_admin_token",
        ),
        (
            "GET",
            Some("cat_not-a-token"),
            "",
            StatusCode::UNAUTHORIZED,
            "invalid_admin_token",
        ),
        (
            "POST",
            Some(&read),
            r#"{"reason":"x"}"#,
            StatusCode::FORBIDDEN,
            "admin_token_read_only",
        ),
        (
            "POST",
            Some(&zoned),
            r#"{"reason":"x"}"#,
            StatusCode::FORBIDDEN,
            "admin_token_zone_mismatch",
        ),
    ];
    for (method, bearer, body, status, code) in cases {
        let path = if *method == "GET" {
            "/v1/audit/tamper"
        } else {
            "/v1/audit/tamper/ack"
        };
        let (got, headers, json) = call(&app, method, path, *bearer, body).await;
        assert_eq!(
            (got, json["error"].as_str()),
            (*status, Some(*code)),
            "{method} {bearer:?}"
        );
        if *status == StatusCode::UNAUTHORIZED {
            assert_eq!(headers["www-authenticate"], "Bearer");
        }
    }
    let revoked = token(&shared, "read", TokenScope::Global).await;
    let digest = caracal_crypto::AdminToken::parse(&revoked)
        .unwrap()
        .digest();
    let record = shared
        .store
        .find_admin_token(&digest)
        .await
        .unwrap()
        .unwrap();
    shared
        .store
        .revoke_admin_token(&record.id, &[])
        .await
        .unwrap();
    let (status, _, _) = call(&app, "GET", "/v1/audit/tamper", Some(&revoked), "").await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a revoked token no longer authenticates"
    );
    let (status, _, _) = call(&app, "GET", "/v1/audit/tamper", Some(&read), "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_tamper_finding_holds_the_audit_role_until_an_audited_acknowledgement() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let api = router(state);
    let audit = router(RoleState::new(Role::Audit, shared.clone()));
    let writer = token(&shared, "write,approve", caracal_store::TokenScope::Global).await;
    shared
        .store
        .record_tamper_findings(&[caracal_store::TamperFinding {
            zone_id: "zone-1".into(),
            seq: 7,
            kind: "content_mismatch".into(),
            detail: "event `ev-7` differs from its content hash".into(),
            found_at_ms: 1,
            acknowledged_at_ms: None,
            acknowledged_by: None,
            ack_reason: None,
        }])
        .await
        .unwrap();
    let ready: ReadyBody = serde_json::from_str(&send(&audit, "/ready", None).await.body).unwrap();
    assert_eq!(ready.reason.as_deref(), Some("audit_tamper_detected"));
    let (_, _, listed) = call(&api, "GET", "/v1/audit/tamper", Some(&writer), "").await;
    assert_eq!(listed["items"][0]["kind"], "content_mismatch");

    for body in ["", "{}", r#"{"reason":""}"#, r#"{"reason":"x","extra":1}"#] {
        let (status, _, json) =
            call(&api, "POST", "/v1/audit/tamper/ack", Some(&writer), body).await;
        assert_eq!(
            (status, json["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "{body}"
        );
    }
    let (status, _, json) = call(
        &api,
        "POST",
        "/v1/audit/tamper/ack",
        Some(&writer),
        r#"{"reason":"restored row 7 from backup"}"#,
    )
    .await;
    assert_eq!(
        (status, json["acknowledged"].as_u64()),
        (StatusCode::OK, Some(1))
    );
    assert_eq!(send(&audit, "/ready", None).await.status, StatusCode::OK);

    // The acknowledgement itself is on the audit stream.
    let streams = &shared.bus.streams;
    streams
        .ensure_group(caracal_bus::stream_names::AUDIT_EVENTS, "check")
        .await
        .unwrap();
    let entries = streams
        .read_group(
            caracal_bus::stream_names::AUDIT_EVENTS,
            "check",
            "c",
            10,
            std::time::Duration::ZERO,
        )
        .await
        .unwrap();
    let event = caracal_audit::Event::parse(entries[0].fields["data"].as_bytes()).unwrap();
    assert_eq!(event.event_type, "audit.tamper_acknowledged");
    assert_eq!(event.metadata_json["reason"], "restored row 7 from backup");
}

#[tokio::test]
async fn audit_search_and_explain_answer_by_zone_with_filters_pages_and_csv() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let app = router(state);
    let rows: Vec<caracal_store::AuditEvent> = (1..=5)
        .map(|seq| caracal_store::AuditEvent {
            id: format!("e{seq}"),
            zone_id: "zone-1".into(),
            event_type: "gateway.request".into(),
            request_id: if seq >= 4 {
                "req-x".into()
            } else {
                format!("req-{seq}")
            },
            decision: if seq == 4 {
                "deny".into()
            } else {
                "allow".into()
            },
            policy_set_id: None,
            policy_set_version_id: None,
            manifest_sha: None,
            evaluation_status: "complete".into(),
            determining_policies: "[]".into(),
            diagnostics: "[]".into(),
            metadata: format!(
                r#"{{"agent_session_id":"s{seq}","application_id":"app-{seq}","note":"a,b","session_id":"ar-{seq}"}}"#
            ),
            occurred_at_ms: 1000 + seq,
            ingested_at_ms: 1000 + seq,
            chain_seq: seq,
            content_sha256: "11".repeat(32),
            prev_content_sha256: "11".repeat(32),
            chain_mac: "22".repeat(32),
            chain_key_id: "chain-1".into(),
        })
        .collect();
    shared.store.insert_audit_events(&rows).await.unwrap();
    let zone_reader = token(
        &shared,
        "read",
        caracal_store::TokenScope::Zone("zone-1".into()),
    )
    .await;
    let other_zone = token(
        &shared,
        "read",
        caracal_store::TokenScope::Zone("zone-2".into()),
    )
    .await;

    let (status, _, page) = call(
        &app,
        "GET",
        "/v1/zones/zone-1/audit?limit=2",
        Some(&zone_reader),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        (ids, page["next_cursor"].as_str()),
        (vec!["e5", "e4"], Some("4"))
    );
    let (_, _, next) = call(
        &app,
        "GET",
        "/v1/zones/zone-1/audit?limit=2&cursor=4",
        Some(&zone_reader),
        "",
    )
    .await;
    assert_eq!(next["items"][0]["id"], "e3");
    assert_eq!(next["items"][0]["metadata_json"]["agent_session_id"], "s3");
    let (_, _, filtered) = call(
        &app,
        "GET",
        "/v1/zones/zone-1/audit?session_id=s2",
        Some(&zone_reader),
        "",
    )
    .await;
    assert_eq!(filtered["items"].as_array().unwrap().len(), 1);
    assert_eq!(filtered["next_cursor"], serde_json::Value::Null);
    // The reference's filters: RFC 3339 bounds, a list of types, metadata's application.
    let found = async |query: &str| {
        let (status, _, page) = call(
            &app,
            "GET",
            &format!("/v1/zones/zone-1/audit?{query}"),
            Some(&zone_reader),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{query}: {page}");
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        found("since=1970-01-01T00:00:01.003Z&until=1970-01-01T00:00:01.005Z").await,
        ["e4", "e3"]
    );
    assert_eq!(
        found("event_type=sts.exchange,gateway.request&until_ms=1002").await,
        ["e1"]
    );
    assert!(found("event_type=sts.exchange").await.is_empty());
    assert_eq!(found("application_id=app-2").await, ["e2"]);
    assert_eq!(found("authority_record_id=ar-3").await, ["e3"]);

    let response = app
        .clone()
        .oneshot(
            Request::get("/v1/zones/zone-1/audit?format=csv&decision=deny")
                .header("authorization", format!("Bearer {zone_reader}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "text/csv; charset=utf-8"
    );
    let csv = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(
        lines[1].starts_with("4,e4,1004,gateway.request,req-x,deny,"),
        "{csv}"
    );
    assert!(
        lines[1].ends_with(
            r#","{""agent_session_id"":""s4"",""application_id"":""app-4"",""note"":""a,b"",""session_id"":""ar-4""}""#
        ),
        "{csv}"
    );

    let (_, _, explained) = call(
        &app,
        "GET",
        "/v1/zones/zone-1/audit/explain?request_id=req-x",
        Some(&zone_reader),
        "",
    )
    .await;
    assert_eq!(explained["final_decision"], "deny");
    assert_eq!(explained["events"].as_array().unwrap().len(), 2);

    // A deny older than the newest 1000 events of a request still decides.
    let long: Vec<caracal_store::AuditEvent> = (0..1001)
        .map(|n| caracal_store::AuditEvent {
            id: format!("long-{n}"),
            request_id: "req-long".into(),
            decision: if n == 0 { "deny" } else { "allow" }.into(),
            chain_seq: 100 + n,
            ..rows[0].clone()
        })
        .collect();
    shared.store.insert_audit_events(&long).await.unwrap();
    let (_, _, explained) = call(
        &app,
        "GET",
        "/v1/zones/zone-1/audit/explain?request_id=req-long",
        Some(&zone_reader),
        "",
    )
    .await;
    assert_eq!(explained["events"].as_array().unwrap().len(), 1000);
    assert_eq!(explained["final_decision"], "deny");

    for (path, bearer, status, code) in [
        (
            "/v1/zones/zone-1/audit",
            &other_zone,
            StatusCode::FORBIDDEN,
            "admin_token_zone_mismatch",
        ),
        (
            "/v1/zones/zone-1/audit?limit=0",
            &zone_reader,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/zones/zone-1/audit?cursor=abc",
            &zone_reader,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/zones/zone-1/audit?decision=maybe",
            &zone_reader,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/zones/zone-1/audit?since=yesterday",
            &zone_reader,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/zones/zone-1/audit?since=1000&since_ms=1000",
            &zone_reader,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/zones/zone-1/audit?event_type=a,,b",
            &zone_reader,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/zones/zone-1/audit?event_type=a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q",
            &zone_reader,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/zones/zone-1/audit?format=xml",
            &zone_reader,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/zones/zone-1/audit?sort=asc",
            &zone_reader,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/zones/zone-1/audit/explain",
            &zone_reader,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/zones/zone-1/audit/explain?request_id=none",
            &zone_reader,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ] {
        let (got, _, json) = call(&app, "GET", path, Some(bearer), "").await;
        assert_eq!(
            (got, json["error"].as_str()),
            (status, Some(code)),
            "{path}"
        );
    }
}

#[tokio::test]
async fn dead_letters_are_listed_and_only_transient_ones_are_replayed() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let app = router(state);
    let writer = token(&shared, "write", caracal_store::TokenScope::Global).await;
    let reader = token(&shared, "read", caracal_store::TokenScope::Global).await;
    let dead = caracal_bus::dead_letter_stream(caracal_bus::stream_names::AUDIT_EVENTS);
    let key = caracal_bus::signature::StreamKey::new(b"k");
    let signed = |stream: &str, mut fields: caracal_bus::Fields| {
        let signature = caracal_bus::signature::sign(&key, stream, &fields);
        fields.insert("_sig".into(), signature);
        fields
    };
    let letter = |reason: &str, id: &str, genuine: bool| {
        let event: caracal_bus::Fields = [("id", id), ("zone_id", "zone-1"), ("data", "{}")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let event = if genuine {
            signed(caracal_bus::stream_names::AUDIT_EVENTS, event)
        } else {
            event
        };
        let payload = serde_json::to_string(&event).unwrap();
        let fields = [
            ("source_id", "1-1"),
            ("reason", reason),
            ("payload", payload.as_str()),
            ("deliveries", "8"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<caracal_bus::Fields>();
        signed(&dead, fields)
    };
    for (reason, id, genuine) in [
        ("store_rejected: conflict", "ev-1", true),
        ("bad_signature", "ev-2", false),
        ("max_deliveries_exceeded", "ev-3", true),
        // Written straight to the dead-letter stream with a replayable reason: not re-signed.
        ("max_deliveries_exceeded", "ev-forged", false),
    ] {
        shared
            .bus
            .streams
            .append(&dead, &letter(reason, id, genuine))
            .await
            .unwrap();
    }
    let (status, _, listed) = call(&app, "GET", "/v1/audit/dlq", Some(&reader), "").await;
    assert_eq!(status, StatusCode::OK);
    let summary: Vec<(String, bool)> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            (
                item["event_id"].as_str().unwrap().to_owned(),
                item["replayable"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("ev-1".into(), true),
            ("ev-2".into(), false),
            ("ev-3".into(), true),
            ("ev-forged".into(), true)
        ]
    );
    // One by its id, with the event it carried; an unknown or malformed id is 404.
    let second = listed["items"][1]["id"].as_str().unwrap().to_owned();
    let (status, _, one) = call(
        &app,
        "GET",
        &format!("/v1/audit/dlq/{second}"),
        Some(&reader),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(
        (
            one["id"].as_str(),
            one["source_event"]["id"].as_str(),
            one["fields"]["reason"].as_str()
        ),
        (Some(second.as_str()), Some("ev-2"), Some("bad_signature"))
    );
    for missing in ["0-1", "99999999999999-0", "not-an-id", "1-x"] {
        let (status, _, json) = call(
            &app,
            "GET",
            &format!("/v1/audit/dlq/{missing}"),
            Some(&reader),
            "",
        )
        .await;
        assert_eq!(
            (status, json["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{missing}"
        );
    }

    let (status, _, json) = call(&app, "POST", "/v1/audit/dlq/replay", Some(&reader), "").await;
    assert_eq!(
        (status, json["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("admin_token_read_only"))
    );
    let (status, _, outcome) = call(
        &app,
        "POST",
        "/v1/audit/dlq/replay?limit=10",
        Some(&writer),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            outcome["scanned"].as_u64(),
            outcome["replayed"].as_u64(),
            outcome["skipped"].as_u64()
        ),
        (Some(4), Some(2), Some(2))
    );
    let remaining = shared.bus.streams.range(&dead, None, 10).await.unwrap();
    let left: Vec<&str> = remaining
        .iter()
        .map(|entry| entry.fields["reason"].as_str())
        .collect();
    assert_eq!(
        left,
        ["bad_signature", "max_deliveries_exceeded"],
        "the forged ones stay for the operator"
    );
    // Replayed entries are back on the audit stream, signed again.
    let back = shared
        .bus
        .streams
        .range(caracal_bus::stream_names::AUDIT_EVENTS, None, 10)
        .await
        .unwrap();
    let ids: Vec<&str> = back
        .iter()
        .map(|entry| entry.fields["id"].as_str())
        .collect();
    assert_eq!(ids, ["ev-1", "ev-3"]);
    assert!(back.iter().all(|entry| entry.fields.contains_key("_sig")));
    let (status, _, _) = call(
        &app,
        "GET",
        "/v1/audit/dlq?after=garbage",
        Some(&reader),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn rejections_the_framework_answers_itself_get_the_json_error_body() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let app = router(state);
    let writer = token(&shared, "write", caracal_store::TokenScope::Global).await;
    // A zone segment that is not UTF-8 fails before the handler runs.
    let (status, headers, json) = call(&app, "GET", "/v1/zones/%FF/audit", Some(&writer), "").await;
    assert_eq!(
        (status, json["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    assert!(headers.contains_key("x-request-id"));
    // A body over the limit.
    let huge = "x".repeat(3 << 20);
    let (status, _, json) = call(&app, "POST", "/v1/audit/tamper/ack", Some(&writer), &huge).await;
    assert_eq!(
        (status, json["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
}

/// A request whose caller hangs up (its future dropped, as hyper does) still runs to its end,
/// and a handler that panics answers the JSON 500 instead of dropping the connection.
#[tokio::test]
async fn a_request_runs_to_its_end_without_its_caller_and_a_panic_is_a_json_500() {
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&finished);
    let app = axum::Router::new()
        .route(
            "/slow",
            axum::routing::get(move || async move {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }),
        )
        .route(
            "/panics",
            axum::routing::get(|| async {
                #[allow(clippy::panic)]
                if true {
                    panic!("a handler bug");
                }
            }),
        )
        .layer(axum::middleware::from_fn(super::run_to_end))
        .layer(axum::middleware::from_fn(crate::error::json_errors));
    let request = Request::get("/slow").body(Body::empty()).unwrap();
    let hung_up = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        app.clone().oneshot(request),
    );
    assert!(hung_up.await.is_err(), "the caller gives up first");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !finished.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the request was cut short"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let request = Request::get("/panics").body(Body::empty()).unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: ErrorBody = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body.error, "internal_error");
}

/// A body whose sender never sends it.
struct NeverSent;

impl axum::body::HttpBody for NeverSent {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

/// A body that does not arrive within `BODY_TIMEOUT` of its head is refused with the role's
/// JSON error, not waited for; a body that does arrive is unaffected.
#[tokio::test(start_paused = true)]
async fn a_body_that_does_not_arrive_in_time_is_refused() {
    let (_keep, api) = role_state(Role::Api);
    let writer = token(&api.shared, "write", caracal_store::TokenScope::Global).await;
    let (_keep_sts, mut sts) = role_state(Role::Sts);
    sts.sts = Some(Arc::new(crate::sts::Sts::start(
        "http://127.0.0.1:8080".into(),
        crate::policy::PolicyCache::default(),
        Arc::clone(&sts.shared.store),
        &sts.shared.kek,
    )));
    let cases = [
        // Each role's code for a request it cannot read (the STS's is the reference's).
        (
            router(api),
            "/v1/zones",
            Some(writer),
            "application/json",
            "invalid_request",
        ),
        (
            router(sts),
            "/oauth/2/token",
            None,
            "application/x-www-form-urlencoded",
            "invalid_token",
        ),
    ];
    for (app, path, bearer, content_type, code) in cases {
        let mut request = Request::post(path)
            .header("content-type", content_type)
            .header("content-length", "100");
        if let Some(bearer) = &bearer {
            request = request.header("authorization", format!("Bearer {bearer}"));
        }
        let started = tokio::time::Instant::now();
        let response = tokio::time::timeout(
            super::BODY_TIMEOUT * 2,
            app.oneshot(request.body(Body::new(NeverSent)).unwrap()),
        )
        .await
        .unwrap_or_else(|_| panic!("{path}: the body was waited for beyond its deadline"))
        .unwrap();
        assert!(started.elapsed() >= super::BODY_TIMEOUT, "{path}");
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{path}: {body}"
        );
    }
}
