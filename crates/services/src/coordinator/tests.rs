#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;

use caracal_core::Role;
use caracal_store::TokenScope;
use http::StatusCode;
use serde_json::{Value, json};

use crate::router;
use crate::state::RoleState;
use crate::test_support::{call, role_state, token};

const ISSUER: &str = "http://sts.test";

/// A zone with an application and a resource it owns (grants active), an STS to mint its
/// lifecycle mandate, and the Coordinator.
struct World {
    _keep: crate::test_support::Keep,
    shared: crate::state::Shared,
    api: axum::Router,
    sts: axum::Router,
    coordinator: axum::Router,
    writer: String,
    zone_id: String,
    app_id: String,
    secret: String,
}

async fn world() -> World {
    world_of(false).await
}

/// The world, its application registered dynamically (`dcr`) when `registered`.
async fn world_of(registered: bool) -> World {
    let (keep, api_state) = role_state(Role::Api);
    let shared = api_state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let api = router(api_state);
    let w = Some(writer.as_str());
    let zone_body = json!({"name": "coord", "dcr_enabled": registered}).to_string();
    let (_, _, zone) = call(&api, "POST", "/v1/zones", w, &zone_body).await;
    let zone_id = zone["id"].as_str().unwrap().to_owned();
    let base = format!("/v1/zones/{zone_id}");
    let (path, body) = if registered {
        ("applications/dcr", r#"{"name":"agent"}"#)
    } else {
        (
            "applications",
            r#"{"name":"agent","registration_method":"managed"}"#,
        )
    };
    let (_, _, app) = call(&api, "POST", &format!("{base}/{path}"), w, body).await;
    let (app_id, secret) = (
        app["id"].as_str().unwrap().to_owned(),
        app["client_secret"].as_str().unwrap().to_owned(),
    );
    let (_, _, provider) = call(
        &api,
        "POST",
        &format!("{base}/providers"),
        w,
        r#"{"name":"none","kind":"none"}"#,
    )
    .await;
    let resource = json!({"name": "Ledger", "identifier": "resource://ledger", "scopes": ["ledger:read"],
        "upstream_url": "http://127.0.0.1:9/api", "credential_provider_id": provider["id"], "operation_enforcement": "transport_uniform"});
    call(
        &api,
        "POST",
        &format!("{base}/resources"),
        w,
        &resource.to_string(),
    )
    .await;
    let document = format!(
        "# caracal:data-document\npackage caracal.authz\nimport rego.v1\napp_ids := {{\"agent\": \"{app_id}\"}}\ngrants := {{\"resource://ledger\": {{\"application\": \"agent\", \"roles\": {{\"{app_id}\": [\"ledger:read\"]}}}}}}\n"
    );
    let (_, _, policy) = call(
        &api,
        "POST",
        &format!("{base}/policies"),
        w,
        &json!({"name": "g", "content": document}).to_string(),
    )
    .await;
    let (_, _, set) = call(
        &api,
        "POST",
        &format!("{base}/policy-sets"),
        w,
        r#"{"name":"s"}"#,
    )
    .await;
    let sets = format!("{base}/policy-sets/{}", set["id"].as_str().unwrap());
    let (_, _, version) = call(
        &api,
        "POST",
        &format!("{sets}/versions"),
        w,
        &json!({"manifest": [{"policy_version_id": policy["version_id"]}]}).to_string(),
    )
    .await;
    call(
        &api,
        "POST",
        &format!("{sets}/activate"),
        w,
        &json!({"version_id": version["id"]}).to_string(),
    )
    .await;

    let mut sts_state = RoleState::new(Role::Sts, shared.clone());
    let sts = Arc::new(crate::sts::Sts::start(
        ISSUER.to_owned(),
        crate::policy::PolicyCache::default(),
        shared.store.clone(),
        &shared.kek,
    ));
    sts.policies
        .refresh_all(shared.store.as_ref(), "t")
        .await
        .unwrap();
    sts_state.sts = Some(sts);
    let mut coordinator_state = RoleState::new(Role::Coordinator, shared.clone());
    coordinator_state.coordinator = Some(super::start_state(
        ISSUER.to_owned(),
        super::Limits::default(),
    ));
    World {
        _keep: keep,
        shared,
        api,
        sts: router(sts_state),
        coordinator: router(coordinator_state),
        writer,
        zone_id,
        app_id,
        secret,
    }
}

impl World {
    async fn exchange(&self, extra: &[(&str, &str)]) -> (StatusCode, Value) {
        let mut fields = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("zone_id", self.zone_id.as_str()),
            ("application_id", self.app_id.as_str()),
            ("client_secret", self.secret.as_str()),
            ("resource", "resource://ledger"),
        ];
        fields.extend_from_slice(extra);
        let body = serde_urlencoded::to_string(fields).unwrap();
        let (status, _, answer) = crate::test_support::call_with(
            &self.sts,
            "POST",
            "/oauth/2/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            &body,
        )
        .await;
        (status, answer)
    }

    async fn lifecycle(&self) -> String {
        let (status, answer) = self.exchange(&[("scope", "agent:lifecycle")]).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer["access_token"].as_str().unwrap().to_owned()
    }

    /// A live edge `id` from `source` to `target` (both the world's application), ten
    /// minutes long, for `ledger:read`, written straight to the store.
    async fn edge(&self, id: &str, source: &str, target: &str) {
        let now = caracal_store::now_ms();
        self.shared
            .store
            .create_delegation_edge(
                &caracal_store::DelegationEdge {
                    id: id.into(),
                    zone_id: self.zone_id.clone(),
                    source_session_id: source.into(),
                    target_session_id: target.into(),
                    issuer_application_id: self.app_id.clone(),
                    receiver_application_id: self.app_id.clone(),
                    parent_edge_id: None,
                    resource_id: None,
                    scopes: vec!["ledger:read".into()],
                    constraints: "{}".into(),
                    status: "active".into(),
                    expires_at_ms: Some(now + 600_000),
                    created_at_ms: now,
                    revoked_at_ms: None,
                },
                &[],
            )
            .await
            .unwrap();
    }

    async fn agents(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: &str,
    ) -> (StatusCode, Value) {
        let path = format!("/zones/{}/agents{path}", self.zone_id);
        let (status, _, answer) = call(&self.coordinator, method, &path, bearer, body).await;
        (status, answer)
    }
}

#[tokio::test]
async fn sessions_start_under_a_lifecycle_mandate_and_terminate_with_their_subtree_and_edges() {
    let world = world().await;
    let bearer = world.lifecycle().await;
    let b = Some(bearer.as_str());
    let start = |parent: Option<&str>| {
        let mut body = json!({"application_id": world.app_id, "labels": [world.app_id], "metadata": {"task": "t"}});
        if let Some(parent) = parent {
            body["parent_id"] = parent.into();
        }
        body.to_string()
    };
    let (status, root) = world.agents("POST", "", b, &start(None)).await;
    assert_eq!(status, StatusCode::CREATED, "{root}");
    assert_eq!(
        (
            root["lifecycle"].as_str(),
            root["lease_generation"].as_i64(),
            root["ttl_seconds"].as_i64()
        ),
        (Some("task"), Some(0), Some(3600))
    );
    let root_id = root["agent_session_id"].as_str().unwrap().to_owned();
    let (_, child) = world.agents("POST", "", b, &start(Some(&root_id))).await;
    let child_id = child["agent_session_id"].as_str().unwrap().to_owned();
    assert_eq!(child["depth"], 1);
    let (_, grandchild) = world.agents("POST", "", b, &start(Some(&child_id))).await;
    let grandchild_id = grandchild["agent_session_id"].as_str().unwrap().to_owned();
    let (status, service) = world
        .agents(
            "POST",
            "",
            b,
            &json!({"application_id": world.app_id, "lifecycle": "service"}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        service["lease_generation"], 1,
        "a service session starts at generation 1"
    );
    assert!(service["heartbeat_deadline_at"].is_string());
    let (_, listed) = world.agents("GET", "", b, "").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 4);

    // A delegation root → child; the child can mint along it.
    world.edge("edge-1", &root_id, &child_id).await;
    let delegated = [
        ("scope", "ledger:read"),
        ("agent_session_id", child_id.as_str()),
        ("delegation_edge_id", "edge-1"),
    ];
    assert_eq!(world.exchange(&delegated).await.0, StatusCode::OK);

    // Terminating the root takes the subtree and the edge down at once.
    let (status, _) = world.agents("DELETE", &format!("/{root_id}"), b, "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for id in [&root_id, &child_id, &grandchild_id] {
        let (_, session) = world.agents("GET", &format!("/{id}"), b, "").await;
        assert_eq!(session["status"], "terminated", "{id}");
    }
    let (_, service_after) = world
        .agents(
            "GET",
            &format!("/{}", service["agent_session_id"].as_str().unwrap()),
            b,
            "",
        )
        .await;
    assert_eq!(service_after["status"], "active", "outside the subtree");
    let (status, refused) = world.exchange(&delegated).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "no mint after the revocation: {refused}"
    );
    // Terminating again changes nothing and answers the same.
    assert_eq!(
        world
            .agents("DELETE", &format!("/{root_id}"), b, "")
            .await
            .0,
        StatusCode::NO_CONTENT
    );

    // The propagation rides the outbox: a revoke message per session, the edge, the epoch.
    let rows = world
        .shared
        .store
        .claim_outbox("test", 1000, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let revoked: Vec<&str> = rows
        .iter()
        .filter(|row| row.stream == super::SESSIONS_REVOKE)
        .filter_map(|row| row.fields.get("agent_session_id").map(String::as_str))
        .collect();
    for id in [&root_id, &child_id, &grandchild_id] {
        assert!(revoked.contains(&id.as_str()), "{id} in {revoked:?}");
    }
    let child_message = rows
        .iter()
        .find(|row| row.fields.get("agent_session_id") == Some(&child_id))
        .unwrap();
    assert_eq!(child_message.fields["delegation_edge_id"], "edge-1");
    assert_eq!(child_message.fields["zone_id"], world.zone_id);
    let epochs: Vec<&str> = rows
        .iter()
        .filter(|row| row.stream == super::DELEGATIONS_INVALIDATE)
        .map(|row| row.fields["epoch"].as_str())
        .collect();
    assert_eq!(epochs.first(), Some(&"2"), "{epochs:?}");

    // Evidence: a start commits its audit event with it; a termination records one first.
    let audit = |rows: &[caracal_store::OutboxRow], kind: &str| {
        rows.iter().any(|row| {
            row.stream == caracal_bus::stream_names::AUDIT_EVENTS
                && row
                    .fields
                    .get("data")
                    .is_some_and(|data| data.contains(kind))
        })
    };
    assert!(audit(&rows, "coordinator.session.start"));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let recorded = world
        .shared
        .bus
        .streams
        .range(caracal_bus::stream_names::AUDIT_EVENTS, None, 1000)
        .await
        .unwrap();
    assert!(recorded.iter().any(|entry| {
        entry
            .fields
            .get("data")
            .is_some_and(|data| data.contains("coordinator.session.terminate"))
    }));
}

#[tokio::test]
async fn the_coordinator_refuses_bad_callers_and_bad_input_with_their_codes() {
    let world = world().await;
    let bearer = world.lifecycle().await;
    let b = Some(bearer.as_str());
    let body = json!({"application_id": world.app_id}).to_string();
    let code = |answer: &Value| answer["error"].as_str().unwrap_or_default().to_owned();
    let (status, answer) = world.agents("POST", "", None, &body).await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::UNAUTHORIZED, "missing_token")
    );
    let (status, answer) = world.agents("POST", "", Some("not.a.token"), &body).await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );
    // A gateway mandate is not a lifecycle mandate.
    let (status, answer) = world.exchange(&[("scope", "ledger:read")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    // Another zone in the path: the mandate is held to its own zone.
    let w = Some(world.writer.as_str());
    let (_, other) = {
        let (s, _, z) = call(&world.api, "POST", "/v1/zones", w, r#"{"name":"other"}"#).await;
        (s, z)
    };
    let other_path = format!("/zones/{}/agents", other["id"].as_str().unwrap());
    let (status, _, answer) = call(&world.coordinator, "POST", &other_path, b, &body).await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::FORBIDDEN, "zone_mismatch")
    );
    // Another application's session cannot be started or ended by this caller.
    let (status, answer) = world
        .agents(
            "POST",
            "",
            b,
            &json!({"application_id": "someone-else"}).to_string(),
        )
        .await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::FORBIDDEN, "parent_ownership_required")
    );
    // Bad ids, unknown sessions, bad bodies.
    let (status, answer) = world.agents("GET", "/bad%20id", b, "").await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::BAD_REQUEST, "invalid_params")
    );
    let (status, answer) = world.agents("GET", "/no-such-session", b, "").await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::NOT_FOUND, "session_not_found")
    );
    let (status, answer) = world.agents("DELETE", "/no-such-session", b, "").await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::NOT_FOUND, "session_not_found")
    );
    for bad in [
        json!({"application_id": world.app_id, "ttl_seconds": 0}),
        json!({"application_id": world.app_id, "lifecycle": "forever"}),
        json!({"application_id": world.app_id, "labels": ["x".repeat(65)]}),
        json!({"application_id": world.app_id, "colour": "red"}),
        json!({"application_id": world.app_id, "parent_id": "missing"}),
    ] {
        let (status, answer) = world.agents("POST", "", b, &bad.to_string()).await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND,
            "{bad}: {status} {answer}"
        );
    }
    // A revoked identity: the record behind the mandate is gone.
    let payload = bearer.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .unwrap(),
    )
    .unwrap();
    world
        .shared
        .store
        .revoke_authority_record(&world.zone_id, claims["sid"].as_str().unwrap(), "test", &[])
        .await
        .unwrap();
    let (status, answer) = world.agents("GET", "", b, "").await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::UNAUTHORIZED, "identity_revoked")
    );
}

#[tokio::test]
async fn delegations_only_narrow_chains_mint_along_them_and_revocation_takes_the_rest_down() {
    let world = world().await;
    let bearer = world.lifecycle().await;
    let b = Some(bearer.as_str());
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let (status, session) = world
            .agents(
                "POST",
                "",
                b,
                &json!({"application_id": world.app_id, "labels": [world.app_id]}).to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        sessions.push(session["agent_session_id"].as_str().unwrap().to_owned());
    }
    let (root, child, grandchild) = (&sessions[0], &sessions[1], &sessions[2]);
    let delegate = |from: &str, to: &str, extra: Value| {
        let mut body = json!({
            "issuer_application_id": world.app_id, "receiver_application_id": world.app_id,
            "source_session_id": from, "target_session_id": to, "scopes": ["ledger:read"],
            "resource_id": "resource://ledger",
        });
        for (key, value) in extra.as_object().unwrap() {
            if value.is_null() {
                body.as_object_mut().unwrap().remove(key);
            } else {
                body[key] = value.clone();
            }
        }
        let path = format!("/zones/{}/delegations", world.zone_id);
        let coordinator = world.coordinator.clone();
        async move {
            let (status, _, answer) = call(&coordinator, "POST", &path, b, &body.to_string()).await;
            (status, answer)
        }
    };
    let (status, first) = delegate(
        root,
        child,
        json!({"ttl_seconds": 600, "constraints": {"max_hops": 2}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let first_id = first["delegation_edge_id"].as_str().unwrap().to_owned();

    // Every widening is refused with its code, naming its rule.
    let exceeds = "delegation_exceeds_parent_authority";
    for (extra, expected, code, needle) in [
        (
            json!({"scopes": ["ledger:write"], "ttl_seconds": 60}),
            StatusCode::FORBIDDEN,
            exceeds,
            "not a scope",
        ),
        (
            json!({"ttl_seconds": 86_400}),
            StatusCode::FORBIDDEN,
            exceeds,
            "outlive",
        ),
        (
            json!({"ttl_seconds": 60, "constraints": {"max_hops": 2}}),
            StatusCode::FORBIDDEN,
            exceeds,
            "max_hops",
        ),
        (
            json!({"ttl_seconds": 60, "resource_id": null}),
            StatusCode::FORBIDDEN,
            "broad_delegation_permission_required",
            "names its resources",
        ),
        (
            json!({}),
            StatusCode::BAD_REQUEST,
            "delegation_expiry_required",
            "expiry",
        ),
        (
            json!({"ttl_seconds": 60, "constraints": {"budget": 3}}),
            StatusCode::BAD_REQUEST,
            "invalid_params",
            "constraints",
        ),
        (
            json!({"ttl_seconds": 60, "scopes": ["agent:lifecycle"]}),
            StatusCode::FORBIDDEN,
            exceeds,
            "agent:lifecycle",
        ),
        (
            json!({"ttl_seconds": 60, "receiver_application_id": "someone-else"}),
            StatusCode::CONFLICT,
            "delegation_application_mismatch",
            "applications",
        ),
    ] {
        let (status, answer) = delegate(child, grandchild, extra.clone()).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (expected, Some(code)),
            "{extra}: {answer}"
        );
        assert!(
            answer["error_description"]
                .as_str()
                .unwrap_or_default()
                .contains(needle),
            "{extra}: {answer}"
        );
    }
    let (status, cycle) = delegate(child, root, json!({"ttl_seconds": 60})).await;
    assert_eq!(
        (status, cycle["error"].as_str()),
        (StatusCode::CONFLICT, Some("delegation_cycle_denied")),
        "{cycle}"
    );

    // A narrower child edge; its parent is found from the source session's inbound edge.
    let (status, second) = delegate(child, grandchild, json!({"ttl_seconds": 300})).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_eq!(second["parent_edge_id"], first_id.as_str());
    let second_id = second["delegation_edge_id"].as_str().unwrap().to_owned();
    // What the Coordinator lets exist, the STS lets mint: a two-hop chain under a budget of 2.
    let minted_along = [
        ("scope", "ledger:read"),
        ("agent_session_id", grandchild.as_str()),
        ("delegation_edge_id", second_id.as_str()),
    ];
    let (status, minted) = world.exchange(&minted_along).await;
    assert_eq!(status, StatusCode::OK, "{minted}");

    // The impact, previewed without taking anything down.
    let sorted = |value: &Value| {
        let mut items: Vec<String> = value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        items.sort();
        items
    };
    let (status, _, impact) = call(
        &world.coordinator,
        "GET",
        &format!("/zones/{}/delegations/{first_id}/impact", world.zone_id),
        b,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{impact}");
    let mut expected_sessions = vec![child.clone(), grandchild.clone()];
    expected_sessions.sort();
    assert_eq!(sorted(&impact["affected_sessions"]), expected_sessions);
    assert_eq!(impact["affected_agents"], impact["affected_sessions"]);
    let mut expected_edges = vec![first_id.clone(), second_id.clone()];
    expected_edges.sort();
    assert_eq!(sorted(&impact["affected_edges"]), expected_edges);
    let (_, session_impact) = world
        .agents("GET", &format!("/{child}/impact"), b, "")
        .await;
    assert_eq!(
        sorted(&session_impact["affected_sessions"]),
        vec![child.clone()]
    );
    assert_eq!(
        world.exchange(&minted_along).await.0,
        StatusCode::OK,
        "a preview changes nothing"
    );

    // Revoking the first edge takes the second and both targets down.
    let path = format!("/zones/{}/delegations/{first_id}", world.zone_id);
    let (status, _, revoked) = call(&world.coordinator, "DELETE", &path, b, "").await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert_eq!(sorted(&revoked["revoked_edges"]), expected_edges);
    assert_eq!(sorted(&revoked["terminated_sessions"]), expected_sessions);
    assert_eq!(sorted(&revoked["affected_sessions"]), expected_sessions);
    let (_, _, second_after) = call(
        &world.coordinator,
        "GET",
        &format!("/zones/{}/delegations/{second_id}", world.zone_id),
        b,
        "",
    )
    .await;
    assert_eq!(second_after["status"], "revoked");
    for id in [child, grandchild] {
        let (_, session) = world.agents("GET", &format!("/{id}"), b, "").await;
        assert_eq!(session["status"], "terminated");
    }
    let (_, root_after) = world.agents("GET", &format!("/{root}"), b, "").await;
    assert_eq!(root_after["status"], "active");
    assert_eq!(
        world.exchange(&minted_along).await.0,
        StatusCode::FORBIDDEN,
        "no mint after revocation"
    );
    let rows = world
        .shared
        .store
        .claim_outbox("test", 1000, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let anchored: Vec<(&str, &str)> = rows
        .iter()
        .filter(|row| row.stream == super::SESSIONS_REVOKE)
        .filter_map(|row| {
            Some((
                row.fields.get("agent_session_id")?.as_str(),
                row.fields.get("delegation_edge_id")?.as_str(),
            ))
        })
        .collect();
    assert!(
        anchored.contains(&(grandchild.as_str(), second_id.as_str())),
        "{anchored:?}"
    );
    assert!(
        anchored.contains(&(child.as_str(), first_id.as_str())),
        "{anchored:?}"
    );
    let (status, _, answer) = call(
        &world.coordinator,
        "DELETE",
        &format!("/zones/{}/delegations/nope", world.zone_id),
        b,
        "",
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("delegation_not_found"))
    );
}

#[tokio::test]
async fn an_idempotency_key_replays_the_same_create_and_refuses_a_different_one() {
    let world = world().await;
    let bearer = world.lifecycle().await;
    let authorization = format!("Bearer {bearer}");
    let path = format!("/zones/{}/agents", world.zone_id);
    let post = |key: &str, body: Value| {
        let (path, authorization, key, coordinator) = (
            path.clone(),
            authorization.clone(),
            key.to_owned(),
            world.coordinator.clone(),
        );
        async move {
            crate::test_support::call_with(
                &coordinator,
                "POST",
                &path,
                &[
                    ("authorization", authorization.as_str()),
                    ("idempotency-key", key.as_str()),
                ],
                &body.to_string(),
            )
            .await
        }
    };
    let body = json!({"application_id": world.app_id, "metadata": {"task": "nightly"}});
    let (status, headers, first) = post("op-42", body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert!(!headers.contains_key("idempotency-replayed"));
    let (status, headers, again) = post("op-42", body.clone()).await;
    assert_eq!((status, &again), (StatusCode::CREATED, &first));
    assert_eq!(headers["idempotency-replayed"], "true");
    let (status, _, conflict) = post("op-42", json!({"application_id": world.app_id})).await;
    assert_eq!(
        (status, conflict["error"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_key_conflict"))
    );
    let (status, _, bad) = post(" padded", body.clone()).await;
    assert_eq!(
        (status, bad["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_params"))
    );
    // Once the session is gone, its receipt no longer answers.
    let id = first["agent_session_id"].as_str().unwrap();
    assert_eq!(
        world
            .agents("DELETE", &format!("/{id}"), Some(&bearer), "")
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let (status, _, inactive) = post("op-42", body.clone()).await;
    assert_eq!(
        (status, inactive["error"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_result_inactive"))
    );

    // The receipt is stored with the create: of concurrent requests with one new key, exactly
    // one creates and every other answers its result.
    let before = world
        .shared
        .store
        .list_sessions(&world.zone_id)
        .await
        .unwrap()
        .len();
    let answers = futures_join_all(
        (0..6)
            .map(|_| post("op-race", body.clone()))
            .collect::<Vec<_>>(),
    )
    .await;
    let created: Vec<&Value> = answers
        .iter()
        .map(|(status, _, answer)| {
            assert_eq!(*status, StatusCode::CREATED, "{answer}");
            answer
        })
        .collect();
    assert!(created.iter().all(|answer| *answer == created[0]));
    let after = world
        .shared
        .store
        .list_sessions(&world.zone_id)
        .await
        .unwrap()
        .len();
    assert_eq!(after, before + 1, "one session for one key");
}

/// Runs the futures concurrently on the test's runtime and collects their outputs in order.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: Vec<F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.unwrap());
    }
    outputs
}

#[tokio::test]
async fn service_leases_are_renewed_by_their_holder_and_fenced_by_a_new_one() {
    let world = world().await;
    let bearer = world.lifecycle().await;
    let b = Some(bearer.as_str());
    let (_, service) = world
        .agents(
            "POST",
            "",
            b,
            &json!({"application_id": world.app_id, "lifecycle": "service"}).to_string(),
        )
        .await;
    let id = service["agent_session_id"].as_str().unwrap().to_owned();
    let beat = |generation: Value| {
        let body = json!({"status": "healthy", "lease_generation": generation}).to_string();
        let path = format!("/{id}/heartbeat");
        let world = &world;
        async move { world.agents("POST", &path, b, &body).await }
    };
    let code = |answer: &Value| answer["error"].as_str().unwrap_or_default().to_owned();
    let (status, renewed) = beat(json!(1)).await;
    assert_eq!(status, StatusCode::OK, "{renewed}");
    assert_eq!(renewed["agent"]["lease_generation"], 1);
    let (status, taken) = world.agents("POST", &format!("/{id}/lease"), b, "").await;
    assert_eq!(
        (status, taken["lease_generation"].as_i64()),
        (StatusCode::OK, Some(2))
    );
    let (status, fenced) = beat(json!(1)).await;
    assert_eq!(
        (status, code(&fenced).as_str()),
        (StatusCode::CONFLICT, "session_lease_fenced")
    );
    assert_eq!(beat(json!(2)).await.0, StatusCode::OK);
    let (status, missing) = beat(Value::Null).await;
    assert_eq!(
        (status, code(&missing).as_str()),
        (StatusCode::BAD_REQUEST, "lease_generation_required")
    );
    let (_, task) = world
        .agents(
            "POST",
            "",
            b,
            &json!({"application_id": world.app_id}).to_string(),
        )
        .await;
    let task_id = task["agent_session_id"].as_str().unwrap();
    let (status, not_service) = world
        .agents(
            "POST",
            &format!("/{task_id}/heartbeat"),
            b,
            r#"{"lease_generation":0}"#,
        )
        .await;
    assert_eq!(
        (status, code(&not_service).as_str()),
        (StatusCode::CONFLICT, "session_not_service")
    );
    // Ending a service session takes its current lease generation.
    let (status, missing) = world.agents("DELETE", &format!("/{id}"), b, "").await;
    assert_eq!(
        (status, code(&missing).as_str()),
        (StatusCode::BAD_REQUEST, "lease_generation_required")
    );
    let (status, stale) = world
        .agents("DELETE", &format!("/{id}"), b, r#"{"lease_generation":1}"#)
        .await;
    assert_eq!(
        (status, code(&stale).as_str()),
        (StatusCode::CONFLICT, "session_lease_fenced")
    );
    assert_eq!(
        world
            .agents("DELETE", &format!("/{id}"), b, r#"{"lease_generation":2}"#)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let (status, ended) = beat(json!(2)).await;
    assert_eq!(
        (status, code(&ended).as_str()),
        (StatusCode::CONFLICT, "session_not_live")
    );
}

#[tokio::test]
async fn a_registered_application_runs_one_task_session_without_a_tree() {
    let world = world_of(true).await;
    let bearer = world.lifecycle().await;
    let b = Some(bearer.as_str());
    let service = json!({"application_id": world.app_id, "lifecycle": "service"}).to_string();
    assert_eq!(
        world.agents("POST", "", b, &service).await.0,
        StatusCode::BAD_REQUEST
    );
    let task = json!({"application_id": world.app_id}).to_string();
    let (status, first) = world.agents("POST", "", b, &task).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let child =
        json!({"application_id": world.app_id, "parent_id": first["agent_session_id"]}).to_string();
    assert_eq!(
        world.agents("POST", "", b, &child).await.0,
        StatusCode::BAD_REQUEST,
        "no tree under it"
    );
    let (status, second) = world.agents("POST", "", b, &task).await;
    assert_eq!(
        (status, second["error"].as_str()),
        (
            StatusCode::TOO_MANY_REQUESTS,
            Some("session_limit_exceeded")
        ),
        "one live session at a time"
    );
}

#[tokio::test]
async fn session_trees_stay_within_their_limits() {
    let mut world = world().await;
    let mut state = RoleState::new(Role::Coordinator, world.shared.clone());
    state.coordinator = Some(super::start_state(
        ISSUER.to_owned(),
        super::Limits {
            max_depth: 1,
            max_children: 1,
            sessions_per_zone: 3,
            sessions_per_application: 3,
            receipts_per_operation: 10_000,
        },
    ));
    world.coordinator = router(state);
    let bearer = world.lifecycle().await;
    let b = Some(bearer.as_str());
    let start = |parent: Option<&str>| {
        let mut body = json!({"application_id": world.app_id});
        if let Some(parent) = parent {
            body["parent_id"] = parent.into();
        }
        body.to_string()
    };
    let (_, root) = world.agents("POST", "", b, &start(None)).await;
    let root_id = root["agent_session_id"].as_str().unwrap().to_owned();
    let (status, child) = world.agents("POST", "", b, &start(Some(&root_id))).await;
    assert_eq!(status, StatusCode::CREATED);
    let child_id = child["agent_session_id"].as_str().unwrap();
    let code = |answer: &Value| answer["error"].as_str().unwrap_or_default().to_owned();
    let (status, answer) = world.agents("POST", "", b, &start(Some(&root_id))).await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (
            StatusCode::TOO_MANY_REQUESTS,
            "session_children_limit_exceeded"
        )
    );
    let (status, answer) = world.agents("POST", "", b, &start(Some(child_id))).await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (
            StatusCode::TOO_MANY_REQUESTS,
            "session_depth_limit_exceeded"
        )
    );
    assert_eq!(
        world.agents("POST", "", b, &start(None)).await.0,
        StatusCode::CREATED
    );
    let (status, answer) = world.agents("POST", "", b, &start(None)).await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "session_zone_limit_exceeded")
    );
    // The application's own cap, when the zone's is wider.
    let mut state = RoleState::new(Role::Coordinator, world.shared.clone());
    state.coordinator = Some(super::start_state(
        ISSUER.to_owned(),
        super::Limits {
            max_depth: 1,
            max_children: 1,
            sessions_per_zone: 100,
            sessions_per_application: 3,
            receipts_per_operation: 10_000,
        },
    ));
    world.coordinator = router(state);
    let (status, answer) = world.agents("POST", "", b, &start(None)).await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "session_limit_exceeded")
    );
}

#[tokio::test]
async fn suspension_stops_minting_until_resumed_and_lapsed_sessions_are_swept() {
    let world = world().await;
    let bearer = world.lifecycle().await;
    let b = Some(bearer.as_str());
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (_, session) = world
            .agents(
                "POST",
                "",
                b,
                &json!({"application_id": world.app_id, "labels": [world.app_id]}).to_string(),
            )
            .await;
        ids.push(session["agent_session_id"].as_str().unwrap().to_owned());
    }
    let (status, _, edge) = call(
        &world.coordinator,
        "POST",
        &format!("/zones/{}/delegations", world.zone_id),
        b,
        &json!({"issuer_application_id": world.app_id, "receiver_application_id": world.app_id,
                "source_session_id": ids[0], "target_session_id": ids[1], "scopes": ["ledger:read"],
                "resource_id": "resource://ledger", "ttl_seconds": 600})
        .to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{edge}");
    let along = [
        ("scope", "ledger:read"),
        ("agent_session_id", ids[1].as_str()),
        (
            "delegation_edge_id",
            edge["delegation_edge_id"].as_str().unwrap(),
        ),
    ];
    assert_eq!(world.exchange(&along).await.0, StatusCode::OK);
    let (status, suspended) = world
        .agents("POST", &format!("/{}/suspend", ids[1]), b, "")
        .await;
    assert_eq!(
        (status, suspended["status"].as_str()),
        (StatusCode::OK, Some("suspended"))
    );
    assert_eq!(
        world.exchange(&along).await.0,
        StatusCode::FORBIDDEN,
        "no mint while suspended"
    );
    let (status, resumed) = world
        .agents("POST", &format!("/{}/resume", ids[1]), b, "")
        .await;
    assert_eq!(
        (status, resumed["status"].as_str()),
        (StatusCode::OK, Some("active"))
    );
    assert_eq!(world.exchange(&along).await.0, StatusCode::OK);

    // A task whose TTL ran out is ended by the sweep, with its revocation message.
    let store = world.shared.store.as_ref();
    let mut lapsed = store
        .get_session(&world.zone_id, &ids[0])
        .await
        .unwrap()
        .unwrap();
    lapsed.id = "lapsed-task".into();
    lapsed.started_at_ms -= 7_200_000;
    store.create_session(&lapsed, &[]).await.unwrap();
    super::sweep_lapsed(store).await;
    assert_eq!(
        store
            .get_session(&world.zone_id, "lapsed-task")
            .await
            .unwrap()
            .unwrap()
            .status,
        "terminated"
    );
    assert_eq!(
        store
            .get_session(&world.zone_id, &ids[0])
            .await
            .unwrap()
            .unwrap()
            .status,
        "active"
    );
    let rows = store
        .claim_outbox("t", 1000, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        rows.iter()
            .any(|row| row.fields.get("agent_session_id").map(String::as_str)
                == Some("lapsed-task")
                && row.fields.get("reason").map(String::as_str) == Some("session_expired"))
    );
    assert!(
        rows.iter()
            .any(|row| row.fields.get("reason").map(String::as_str) == Some("session_suspended"))
    );
}

#[tokio::test]
async fn the_subject_kill_switch_revokes_everything_issued_for_the_subject() {
    let world = world().await;
    let bearer = world.lifecycle().await;
    let b = Some(bearer.as_str());
    let (_, root) = world
        .agents(
            "POST",
            "",
            b,
            &json!({"application_id": world.app_id}).to_string(),
        )
        .await;
    let root_id = root["agent_session_id"].as_str().unwrap().to_owned();
    let (_, child) = world
        .agents(
            "POST",
            "",
            b,
            &json!({"application_id": world.app_id, "parent_id": root_id}).to_string(),
        )
        .await;
    let child_id = child["agent_session_id"].as_str().unwrap().to_owned();
    let w = Some(world.writer.as_str());
    let path = format!(
        "/v1/zones/{}/subjects/{}/revoke",
        world.zone_id, world.app_id
    );
    let (status, _, answer) =
        call(&world.api, "POST", &path, w, r#"{"reason":"compromised"}"#).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["terminated_sessions"], 2);
    assert!(answer["revoked_records"].as_u64().unwrap() >= 1);
    // The lifecycle mandate's record is revoked: the Coordinator refuses it now.
    let (status, refused) = world.agents("GET", "", b, "").await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("identity_revoked"))
    );
    for id in [&root_id, &child_id] {
        let session = world
            .shared
            .store
            .get_session(&world.zone_id, id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(session.status, "terminated");
    }
    let rows = world
        .shared
        .store
        .claim_outbox("t", 1000, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        rows.iter().any(
            |row| row.stream == super::SESSIONS_REVOKE && row.fields.contains_key("session_id")
        )
    );
    assert!(
        rows.iter()
            .any(|row| row.fields.get("agent_session_id") == Some(&child_id))
    );
    // A read token cannot pull the switch.
    let reader = token(&world.shared, "read", TokenScope::Global).await;
    let (status, _, _) = call(&world.api, "POST", &path, Some(&reader), "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// The published admin client's `coordinator_token` calls: an admin token reads, suspends,
/// resumes, terminates and revokes across the zone's applications, within its capability and
/// zone, and nowhere else.
#[tokio::test]
async fn an_admin_token_acts_as_operator_on_the_operator_routes_only() {
    let world = world().await;
    let bearer = world.lifecycle().await;
    let b = Some(bearer.as_str());
    let operator = Some(world.writer.as_str());
    let code = |answer: &Value| answer["error"].as_str().unwrap_or_default().to_owned();
    let start = |parent: Option<&str>, lifecycle: &str| {
        let mut body = json!({"application_id": world.app_id, "lifecycle": lifecycle});
        if let Some(parent) = parent {
            body["parent_id"] = parent.into();
        }
        body.to_string()
    };
    let (_, root) = world.agents("POST", "", b, &start(None, "task")).await;
    let root_id = root["agent_session_id"].as_str().unwrap().to_owned();
    let (_, child) = world
        .agents("POST", "", b, &start(Some(&root_id), "task"))
        .await;
    let child_id = child["agent_session_id"].as_str().unwrap().to_owned();
    let (_, service) = world.agents("POST", "", b, &start(None, "service")).await;
    let service_id = service["agent_session_id"].as_str().unwrap().to_owned();
    world.edge("edge-op", &root_id, &child_id).await;
    let zone = format!("/zones/{}", world.zone_id);
    let get = |path: String, bearer: Option<&str>| {
        let coordinator = world.coordinator.clone();
        let bearer = bearer.map(str::to_owned);
        async move {
            let (status, _, answer) = call(&coordinator, "GET", &path, bearer.as_deref(), "").await;
            (status, answer)
        }
    };

    // Reads.
    let (status, read) = get(format!("{zone}/agents/{root_id}"), operator).await;
    assert_eq!(
        (status, read["agent_session_id"].as_str()),
        (StatusCode::OK, Some(root_id.as_str()))
    );
    let (status, listed) = get(format!("{zone}/agents"), operator).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["items"].as_array().unwrap().len(), 3);
    let (status, children) = get(format!("{zone}/agents/{root_id}/children"), operator).await;
    assert_eq!(status, StatusCode::OK, "{children}");
    assert_eq!(children["items"][0]["agent_session_id"], child_id.as_str());
    assert_eq!(children["items"].as_array().unwrap().len(), 1);
    let (status, authority) = get(
        format!("{zone}/agents/{child_id}/effective-authority"),
        operator,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{authority}");
    assert_eq!(authority["agent_session_id"], child_id.as_str());
    assert_eq!(authority["inbound_edges"][0]["id"], "edge-op");
    assert_eq!(authority["scopes"], json!(["ledger:read"]));
    let (_, root_authority) = get(format!("{zone}/agents/{root_id}/effective-authority"), b).await;
    assert_eq!(
        root_authority["inbound_edges"],
        json!([]),
        "the agent reads it too"
    );
    for bearer in [operator, b] {
        let (status, active) = get(format!("{zone}/delegations/active"), bearer).await;
        assert_eq!(status, StatusCode::OK, "{active}");
        assert_eq!(active["items"][0]["id"], "edge-op");
        assert_eq!(active["next_cursor"], Value::Null);
    }
    let (_, paged) = get(format!("{zone}/delegations/active?limit=1"), operator).await;
    assert_eq!(
        paged["next_cursor"], "edge-op",
        "a full page names where the next starts"
    );
    let (_, after) = get(
        format!("{zone}/delegations/active?cursor=edge-op"),
        operator,
    )
    .await;
    assert_eq!(after["items"], json!([]));
    for bad in ["limit=0", "limit=501", "cursor=bad%20id", "colour=red"] {
        let (status, answer) = get(format!("{zone}/delegations/active?{bad}"), operator).await;
        assert_eq!(
            (status, code(&answer).as_str()),
            (StatusCode::BAD_REQUEST, "invalid_params"),
            "{bad}"
        );
    }
    let (status, traversed) = get(format!("{zone}/delegations/edge-op/traverse"), operator).await;
    assert_eq!(status, StatusCode::OK, "{traversed}");
    assert_eq!(traversed[0]["id"], "edge-op");
    let (_, impact) = get(format!("{zone}/delegations/edge-op/impact"), operator).await;
    assert_eq!(impact["edge_id"], "edge-op");
    assert_eq!(impact["affected_agents"], json!([child_id]));
    let (status, inbound) = get(format!("{zone}/delegations/inbound/{child_id}"), operator).await;
    assert_eq!(
        (status, inbound["items"][0]["id"].as_str()),
        (StatusCode::OK, Some("edge-op"))
    );

    // What an admin token may not do: unknown, read-only for a change, another zone, an
    // agent-only route.
    let unknown = caracal_crypto::AdminToken::generate().unwrap();
    let (status, answer) = get(format!("{zone}/agents/{root_id}"), Some(unknown.expose())).await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_admin_token")
    );
    let reader = crate::test_support::token(&world.shared, "read", TokenScope::Global).await;
    let (status, _) = get(format!("{zone}/agents/{root_id}"), Some(&reader)).await;
    assert_eq!(status, StatusCode::OK, "a read token reads");
    let suspend = format!("{zone}/agents/{child_id}/suspend");
    let (status, _, answer) = call(&world.coordinator, "PATCH", &suspend, Some(&reader), "").await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::FORBIDDEN, "admin_token_read_only")
    );
    let elsewhere =
        crate::test_support::token(&world.shared, "write", TokenScope::Zone("other".into())).await;
    let (status, answer) = get(format!("{zone}/agents/{root_id}"), Some(&elsewhere)).await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::FORBIDDEN, "admin_token_zone_mismatch")
    );
    // A zone the deployment does not have (or has archived) is not found, as on the API.
    let (status, answer) = get("/zones/no-such-zone/agents".to_owned(), operator).await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let (status, answer) = world
        .agents("POST", "", operator, &start(None, "task"))
        .await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );
    let (status, _, answer) = call(
        &world.coordinator,
        "POST",
        &format!("{zone}/agents/{service_id}/heartbeat"),
        operator,
        r#"{"lease_generation":1}"#,
    )
    .await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );

    // Changes, each recorded with the operator's token as actor.
    let (status, _, suspended) = call(&world.coordinator, "PATCH", &suspend, operator, "").await;
    assert_eq!(
        (status, suspended["status"].as_str()),
        (StatusCode::OK, Some("suspended"))
    );
    let resume = format!("{zone}/agents/{child_id}/resume");
    let (status, _, resumed) = call(&world.coordinator, "PATCH", &resume, operator, "").await;
    assert_eq!(
        (status, resumed["status"].as_str()),
        (StatusCode::OK, Some("active"))
    );
    let actors: Vec<(String, Value)> =
        crate::test_support::outbox_events(world.shared.store.as_ref())
            .await
            .into_iter()
            .filter(|event| {
                matches!(
                    event["event_type"].as_str(),
                    Some("coordinator.session.suspend" | "coordinator.session.resume")
                )
            })
            .map(|event| {
                let metadata = &event["metadata_json"];
                (
                    metadata["actor"].as_str().unwrap().to_owned(),
                    metadata["authority_record"].clone(),
                )
            })
            .collect();
    assert_eq!(actors.len(), 2, "{actors:?}");
    assert!(
        actors
            .iter()
            .all(|(actor, record)| actor.starts_with("admin:tok_") && record.is_null()),
        "{actors:?}"
    );
    // A service session ends without its lease generation when an operator ends it; an agent
    // still has to name it.
    let service_path = format!("/{service_id}");
    let (status, answer) = world.agents("DELETE", &service_path, b, "").await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::BAD_REQUEST, "lease_generation_required")
    );
    let (status, _) = world.agents("DELETE", &service_path, operator, "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, ended) = get(format!("{zone}/agents/{service_id}"), operator).await;
    assert_eq!(ended["status"], "terminated");
    let (status, _, _) = call(
        &world.coordinator,
        "PATCH",
        &format!("{zone}/delegations/edge-op/revoke"),
        operator,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, authority) = get(
        format!("{zone}/agents/{child_id}/effective-authority"),
        operator,
    )
    .await;
    assert_eq!(authority["inbound_edges"], json!([]), "{authority}");
    let (_, active) = get(format!("{zone}/delegations/active"), operator).await;
    assert_eq!(active["items"], json!([]));
}

/// Bearers that look like admin tokens but are not, and queries no client sends, get a 4xx
/// with a code on the operator routes, never a 5xx.
#[tokio::test]
async fn hostile_bearers_and_queries_on_the_operator_routes_get_a_4xx() {
    let world = world().await;
    let zone = format!("/zones/{}", world.zone_id);
    let long = format!("cat_{}", "A".repeat(5000));
    let bearers = [
        "cat_",
        "cat_%%%",
        "cat_AAAA",
        "cat_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        long.as_str(),
        "cat_\u{00e9}\u{00e9}",
        "eyJhbGciOiJub25lIn0.e30.",
    ];
    for bearer in bearers {
        for path in [
            format!("{zone}/agents/s-1"),
            format!("{zone}/delegations/active"),
            format!("{zone}/delegations/e-1/traverse"),
        ] {
            let (status, _, answer) =
                call(&world.coordinator, "GET", &path, Some(bearer), "").await;
            assert!(
                status.is_client_error() && answer["error"].is_string(),
                "{bearer:.20} {path}: {status} {answer}"
            );
        }
    }
    let operator = Some(world.writer.as_str());
    for query in [
        "limit=%ff",
        "limit=99999999999999999999",
        "limit=-1",
        "cursor=%00",
        "limit=1&limit=2",
        "cursor=",
        "%zz",
    ] {
        let path = format!("{zone}/delegations/active?{query}");
        let (status, _, answer) = call(&world.coordinator, "GET", &path, operator, "").await;
        assert!(
            status.is_client_error() && answer["error"].is_string(),
            "{query}: {status} {answer}"
        );
    }
}

/// Failed admin tokens on the Coordinator count toward the address's lockout as on the API;
/// agents' mandates from the same address are not locked out.
#[tokio::test]
async fn failed_admin_tokens_lock_the_address_out_of_the_operator_routes() {
    use axum::extract::connect_info::MockConnectInfo;
    let (_keep, mut state) = crate::test_support::role_state(Role::Coordinator);
    state.coordinator = Some(super::start_state(
        ISSUER.to_owned(),
        super::Limits::default(),
    ));
    let writer = token(&state.shared, "write", TokenScope::Global).await;
    let app = router(state).layer(MockConnectInfo(std::net::SocketAddr::from((
        [192, 0, 2, 9],
        5000,
    ))));
    let code = |answer: &Value| answer["error"].as_str().unwrap_or_default().to_owned();
    let bad = format!("cat_{}", "B".repeat(43));
    crate::test_support::budget_minute_ahead(20).await;
    for attempt in 1..=crate::auth::AUTH_FAILURES_PER_WINDOW {
        let (status, _, answer) = call(&app, "GET", "/zones/z/agents/s", Some(&bad), "").await;
        assert_eq!(
            (status, code(&answer).as_str()),
            (StatusCode::UNAUTHORIZED, "invalid_admin_token"),
            "{attempt}"
        );
    }
    let (status, headers, answer) = call(&app, "GET", "/zones/z/agents/s", Some(&writer), "").await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    assert!(headers.contains_key("retry-after"));
    let (status, _, answer) = call(&app, "GET", "/zones/z/agents/s", Some("not.a.token"), "").await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_token"),
        "a mandate is judged on its own"
    );
}

#[tokio::test]
async fn a_child_inherits_its_parents_delegation_one_hop_further_down() {
    let world = world().await;
    let bearer = world.lifecycle().await;
    let b = Some(bearer.as_str());
    let start = |extra: Value| {
        let mut body = json!({"application_id": world.app_id, "labels": [world.app_id]});
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        let world = &world;
        async move { world.agents("POST", "", b, &body.to_string()).await }
    };
    let id = |answer: &Value, field: &str| answer[field].as_str().unwrap_or_default().to_owned();
    let (_, root) = start(json!({})).await;
    let root = id(&root, "agent_session_id");
    let (status, mid) = start(json!({"parent_id": root})).await;
    assert_eq!(status, StatusCode::CREATED, "{mid}");
    assert_eq!(
        mid["delegation_edge_id"],
        Value::Null,
        "root holds nothing to inherit"
    );
    let mid = id(&mid, "agent_session_id");
    let delegations = format!("/zones/{}/delegations", world.zone_id);
    let delegate = |max_hops: u32| {
        let body = json!({
            "issuer_application_id": world.app_id, "receiver_application_id": world.app_id,
            "source_session_id": root, "target_session_id": mid, "scopes": ["ledger:read"],
            "resource_id": "resource://ledger", "ttl_seconds": 600,
            "constraints": {"max_hops": max_hops},
        });
        let (coordinator, path) = (world.coordinator.clone(), delegations.clone());
        async move {
            call(&coordinator, "POST", &path, b, &body.to_string())
                .await
                .2
        }
    };
    let first = delegate(2).await;
    let first_id = id(&first, "delegation_edge_id");

    // The child gets a copy of mid's delegation, one hop down, and mints along it.
    let (status, child) = start(json!({"parent_id": mid, "parent_authority": "inherit"})).await;
    assert_eq!(status, StatusCode::CREATED, "{child}");
    let inherited = id(&child, "delegation_edge_id");
    let child = id(&child, "agent_session_id");
    let (status, _, edge) = call(
        &world.coordinator,
        "GET",
        &format!("{delegations}/{inherited}"),
        b,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{edge}");
    assert_eq!(
        (
            edge["source_session_id"].as_str(),
            edge["target_session_id"].as_str(),
            edge["parent_edge_id"].as_str(),
            &edge["scopes"],
            &edge["expires_at"],
            &edge["max_hops"],
        ),
        (
            Some(mid.as_str()),
            Some(child.as_str()),
            Some(first_id.as_str()),
            &json!(["ledger:read"]),
            &first["expires_at"],
            &json!(1),
        )
    );
    let (status, minted) = world
        .exchange(&[
            ("scope", "ledger:read"),
            ("agent_session_id", child.as_str()),
            ("delegation_edge_id", inherited.as_str()),
        ])
        .await;
    assert_eq!(status, StatusCode::OK, "{minted}");

    // The receiver checks a handed-over edge: its own and live, else 404.
    let inbound = |session: &str, edge: &str| {
        let path = format!("{delegations}/inbound/{session}/{edge}");
        let coordinator = world.coordinator.clone();
        async move { call(&coordinator, "GET", &path, b, "").await }
    };
    let (status, _, found) = inbound(&child, &inherited).await;
    assert_eq!(
        (status, found["id"].as_str(), found["status"].as_str()),
        (StatusCode::OK, Some(inherited.as_str()), Some("active"))
    );
    for (session, edge) in [
        (&mid, &inherited),
        (&child, &first_id),
        (&child, &"nope".to_owned()),
    ] {
        let (status, _, answer) = inbound(session, edge).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("delegation_not_found")),
            "{session} {edge}"
        );
    }
    let (_, _, listing) = call(
        &world.coordinator,
        "GET",
        &format!("{delegations}/inbound/{child}"),
        b,
        "",
    )
    .await;
    assert_eq!(listing["items"][0]["id"], inherited.as_str());
    assert_eq!(listing["next_cursor"], Value::Null);

    // `none` inherits nothing; a copy at the end of its hop budget cannot be copied again.
    let (status, plain) = start(json!({"parent_id": mid, "parent_authority": "none"})).await;
    assert_eq!(
        (status, &plain["delegation_edge_id"]),
        (StatusCode::CREATED, &Value::Null)
    );
    let (status, refused) = start(json!({"parent_id": child})).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (
            StatusCode::FORBIDDEN,
            Some("delegation_exceeds_parent_authority")
        ),
        "{refused}"
    );
    assert!(
        refused["error_description"]
            .as_str()
            .unwrap()
            .contains("max_hops")
    );

    // Two delegations to mid: the child names one, or the start is refused.
    let second = delegate(3).await;
    let (status, ambiguous) = start(json!({"parent_id": mid})).await;
    assert_eq!(
        (status, ambiguous["error"].as_str()),
        (StatusCode::CONFLICT, Some("inherit_parent_edge_ambiguous"))
    );
    let (status, named) = start(
        json!({"parent_id": mid, "inherit_parent_edge_id": id(&second, "delegation_edge_id")}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{named}");
    let (_, _, named_edge) = call(
        &world.coordinator,
        "GET",
        &format!("{delegations}/{}", id(&named, "delegation_edge_id")),
        b,
        "",
    )
    .await;
    assert_eq!(named_edge["parent_edge_id"], second["delegation_edge_id"]);
    assert_eq!(named_edge["max_hops"], 2);
    for (extra, status, code) in [
        (
            json!({"parent_id": mid, "inherit_parent_edge_id": "nope"}),
            StatusCode::CONFLICT,
            "inherit_parent_edge_not_active",
        ),
        (
            json!({"inherit_parent_edge_id": first_id}),
            StatusCode::BAD_REQUEST,
            "invalid_params",
        ),
        (
            json!({"parent_id": mid, "parent_authority": "none", "inherit_parent_edge_id": first_id}),
            StatusCode::BAD_REQUEST,
            "invalid_params",
        ),
    ] {
        let (got, answer) = start(extra.clone()).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(code)),
            "{extra}"
        );
    }

    // A broad delegation is inherited only by a caller who could issue one.
    let (_, wide) = start(json!({"parent_id": root})).await;
    let wide = id(&wide, "agent_session_id");
    world.edge("broad-edge", &root, &wide).await;
    let (status, refused) = start(json!({"parent_id": wide})).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (
            StatusCode::FORBIDDEN,
            Some("broad_delegation_permission_required")
        )
    );

    // Revoking mid's first delegation takes the copy and the child down with it.
    let (status, _, revoked) = call(
        &world.coordinator,
        "PATCH",
        &format!("{delegations}/{first_id}/revoke"),
        b,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert!(
        revoked["revoked_edges"]
            .as_array()
            .unwrap()
            .contains(&json!(inherited)),
        "{revoked}"
    );
    assert!(
        revoked["terminated_sessions"]
            .as_array()
            .unwrap()
            .contains(&json!(child)),
        "{revoked}"
    );
    let (status, _, _) = inbound(&child, &inherited).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_application_holds_a_bounded_number_of_idempotency_receipts() {
    let mut world = world().await;
    let mut state = RoleState::new(Role::Coordinator, world.shared.clone());
    state.coordinator = Some(super::start_state(
        ISSUER.to_owned(),
        super::Limits {
            receipts_per_operation: 2,
            ..super::Limits::default()
        },
    ));
    world.coordinator = router(state);
    let bearer = world.lifecycle().await;
    let authorization = format!("Bearer {bearer}");
    let path = format!("/zones/{}/agents", world.zone_id);
    let body = json!({"application_id": world.app_id}).to_string();
    let start = async |key: Option<&str>| {
        let mut headers = vec![("authorization", authorization.as_str())];
        if let Some(key) = key {
            headers.push(("idempotency-key", key));
        }
        let (status, _, answer) =
            crate::test_support::call_with(&world.coordinator, "POST", &path, &headers, &body)
                .await;
        (status, answer["error"].as_str().map(str::to_owned))
    };
    assert_eq!(start(Some("k-1")).await, (StatusCode::CREATED, None));
    assert_eq!(start(Some("k-2")).await, (StatusCode::CREATED, None));
    assert_eq!(
        start(Some("k-3")).await,
        (
            StatusCode::TOO_MANY_REQUESTS,
            Some("idempotency_receipt_limit_exceeded".to_owned())
        )
    );
    assert_eq!(
        start(Some("k-1")).await,
        (StatusCode::CREATED, None),
        "a stored key still replays"
    );
    assert_eq!(
        start(None).await,
        (StatusCode::CREATED, None),
        "a create without a key stores no receipt"
    );
}

#[tokio::test]
async fn verify_answers_a_verdict_from_the_keys_and_live_state_and_budgets_callers() {
    let world = world().await;
    let bearer = world.lifecycle().await;
    let b = Some(bearer.as_str());
    let verify = async |body: Value| {
        let (status, _, answer) = call(
            &world.coordinator,
            "POST",
            "/v1/verify",
            None,
            &body.to_string(),
        )
        .await;
        (status, answer)
    };
    let verdict = |answer: &Value| -> String {
        if answer["valid"] == true {
            "valid".to_owned()
        } else {
            answer["error"].as_str().unwrap_or("?").to_owned()
        }
    };
    let zone = world.zone_id.as_str();
    let (status, answer) = verify(json!({"token": bearer, "zone_id": zone})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(verdict(&answer), "valid", "{answer}");
    assert_eq!(answer["claims"]["use"], "session");
    assert_eq!(answer["claims"]["client_id"], world.app_id.as_str());
    let auth = format!("Bearer {bearer}");
    let mut tampered = bearer.clone();
    let last = if tampered.ends_with('A') { "B" } else { "A" };
    tampered.replace_range(tampered.len() - 1.., last);
    for (body, expected) in [
        (json!({"authorization": auth, "zone_id": zone}), "valid"),
        (
            json!({"token": bearer, "zone_id": zone, "required_scope": "agent:lifecycle"}),
            "valid",
        ),
        (
            json!({"token": bearer, "zone_id": zone, "required_scope": "ledger:write"}),
            "missing_scope",
        ),
        (
            json!({"token": bearer, "zone_id": zone, "require_session": true}),
            "session_required",
        ),
        (
            json!({"token": bearer, "zone_id": zone, "require_delegation": true}),
            "delegation_required",
        ),
        (json!({"token": tampered, "zone_id": zone}), "invalid_token"),
        (
            json!({"token": bearer, "zone_id": "another-zone"}),
            "invalid_token",
        ),
        (
            json!({"token": "not.a.jwt", "zone_id": zone}),
            "invalid_token",
        ),
    ] {
        let (status, answer) = verify(body.clone()).await;
        assert_eq!(
            (status, verdict(&answer)),
            (StatusCode::OK, expected.to_owned()),
            "{body}"
        );
    }
    for body in [
        json!({"zone_id": zone}),
        json!({"token": bearer, "authorization": auth, "zone_id": zone}),
        json!({"authorization": format!("Basic {bearer}"), "zone_id": zone}),
        json!({"token": bearer}),
        json!({"token": bearer, "zone_id": zone, "audience": "x"}),
        json!({"token": "", "zone_id": zone}),
    ] {
        let (status, answer) = verify(body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
    }

    // A delegated mandate is valid while its session and edge live, and not after.
    let start = json!({"application_id": world.app_id, "labels": [world.app_id]}).to_string();
    let (_, source) = world.agents("POST", "", b, &start).await;
    let (_, target) = world.agents("POST", "", b, &start).await;
    let (source, target) = (
        source["agent_session_id"].as_str().unwrap().to_owned(),
        target["agent_session_id"].as_str().unwrap().to_owned(),
    );
    world.edge("edge-v", &source, &target).await;
    let (status, minted) = world
        .exchange(&[
            ("scope", "ledger:read"),
            ("agent_session_id", target.as_str()),
            ("delegation_edge_id", "edge-v"),
        ])
        .await;
    assert_eq!(status, StatusCode::OK, "{minted}");
    let delegated = minted["access_token"].as_str().unwrap().to_owned();
    let strict = json!({"token": delegated, "zone_id": zone, "require_session": true,
        "require_delegation": true, "required_scope": "ledger:read"});
    assert_eq!(verdict(&verify(strict.clone()).await.1), "valid");
    // Its session suspended, it stops verifying; resumed, it verifies again.
    for (action, expected) in [("suspend", "session_inactive"), ("resume", "valid")] {
        let (status, answer) = world
            .agents("POST", &format!("/{target}/{action}"), b, "{}")
            .await;
        assert!(status.is_success(), "{action}: {answer}");
        assert_eq!(
            verdict(&verify(strict.clone()).await.1),
            expected,
            "{action}"
        );
    }
    let (status, _, _) = call(
        &world.coordinator,
        "PATCH",
        &format!("/zones/{zone}/delegations/edge-v/revoke"),
        b,
        "{}",
    )
    .await;
    assert!(status.is_success(), "{status}");
    assert_eq!(verdict(&verify(strict).await.1), "delegation_revoked");

    // An archived application's mandates stop verifying.
    let (status, _, _) = call(
        &world.api,
        "DELETE",
        &format!("/v1/zones/{zone}/applications/{}", world.app_id),
        Some(&world.writer),
        "",
    )
    .await;
    assert!(status.is_success(), "{status}");
    let (_, answer) = verify(json!({"token": bearer, "zone_id": zone})).await;
    assert_eq!(verdict(&answer), "identity_revoked");

    // Sixty a minute per address (these calls have none, so they share one budget).
    let mut refused = false;
    for _ in 0..70 {
        let (status, _) = verify(json!({"token": bearer, "zone_id": zone})).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            refused = true;
            break;
        }
    }
    assert!(refused, "the budget refuses past sixty a minute");
}
