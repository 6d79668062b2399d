use std::sync::atomic::Ordering;

use caracal_core::Role;
use http::StatusCode;
use serde_json::{Value, json};

use super::Control;
use crate::router;
use crate::state::RoleState;
use crate::sts::tests::{World, world};
use crate::test_support::{call, call_with};

/// The STS's issuer in [`world`].
const ISSUER: &str = "http://sts.test";

/// The world's API role with control invocations on (or off).
fn api(world: &World, enabled: bool) -> axum::Router {
    let mut state = RoleState::new(Role::Api, world.shared.clone());
    state.control = Some(Control::new(enabled, ISSUER.to_owned()));
    router(state)
}

/// A control key of the world's zone holding `scopes`; its id and secret.
async fn control_key(world: &World, scopes: &[&str]) -> (String, String) {
    let mut traits = vec!["control:invoke".to_owned()];
    traits.extend(scopes.iter().map(|scope| format!("control:scope:{scope}")));
    let body = json!({"name": format!("key-{}", uuid::Uuid::now_v7().simple()),
                      "registration_method": "managed", "traits": traits});
    let (status, _, app) = call(
        &world.api,
        "POST",
        &format!("/v1/zones/{}/applications", world.zone_id),
        Some(&world.writer),
        &body.to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{app}");
    (
        app["id"].as_str().unwrap().to_owned(),
        app["client_secret"].as_str().unwrap().to_owned(),
    )
}

/// A control mandate for `scope`, as `ControlClient` mints it (no zone: the key's own).
async fn mint(world: &World, (id, secret): &(String, String), scope: &str) -> String {
    let form = serde_urlencoded::to_string([
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("application_id", id),
        ("client_secret", secret),
        ("resource", "caracal-control"),
        ("scope", scope),
    ])
    .unwrap();
    let (status, _, body) = world.exchange(&form).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

async fn invoke(api: &axum::Router, token: &str, body: Value) -> (StatusCode, Value) {
    let (status, _, answer) = call(
        api,
        "POST",
        "/v1/control/invoke",
        Some(token),
        &body.to_string(),
    )
    .await;
    (status, answer)
}

/// The `control.invoke` events recorded so far, oldest first.
async fn control_events(world: &World) -> Vec<Value> {
    crate::test_support::stream_events(&world.shared)
        .await
        .into_iter()
        .filter(|event| event["event_type"] == "control.invoke")
        .collect()
}

fn code(answer: &Value) -> &str {
    answer["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_control_key_runs_catalog_commands_in_its_zone_once_per_mandate() {
    let world = world().await;
    let api = api(&world, true);
    let key = control_key(
        &world,
        &[
            "control:app:read",
            "control:resource:write",
            "control:policy:read",
            "control:audit:read",
        ],
    )
    .await;

    let token = mint(&world, &key, "control:app:read").await;
    let list = json!({"command": "app", "subcommand": "list", "flags": {"limit": 50}});
    let (status, answer) = invoke(&api, &token, list.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["ok"], true);
    let names: Vec<&str> = answer["result"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|app| app["name"].as_str())
        .collect();
    assert!(names.contains(&"billing"), "{names:?}");
    // One use per mandate.
    let (status, answer) = invoke(&api, &token, list).await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::UNAUTHORIZED, "token_replay")
    );

    // A route outside the zone's paths, and the zone's admin audit: both reads.
    let token = mint(&world, &key, "control:policy:read").await;
    let content = "# caracal:data-document\npackage caracal.authz\nimport rego.v1\napp_ids := {\"a\": \"b\"}\n";
    let validate =
        json!({"command": "policy", "subcommand": "validate", "flags": {"content": content}});
    let (status, answer) = invoke(&api, &token, validate).await;
    assert_eq!(
        (status, &answer["result"]["valid"]),
        (StatusCode::OK, &json!(true)),
        "{answer}"
    );
    let token = mint(&world, &key, "control:audit:read").await;
    let (status, answer) = invoke(
        &api,
        &token,
        json!({"command": "audit", "subcommand": "admin", "flags": {}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["result"]["items"].is_array(), "{answer}");
    // `audit explain` runs the audit's explain route (the ingested ledger, which this world
    // does not fill: so a request it never saw, and a missing request id).
    for (flags, status, expected) in [
        (
            json!({"request_id": "never-seen"}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (json!({}), StatusCode::BAD_REQUEST, "invalid"),
    ] {
        let token = mint(&world, &key, "control:audit:read").await;
        let explain = json!({"command": "audit", "subcommand": "explain", "flags": flags});
        let (got, answer) = invoke(&api, &token, explain).await;
        assert_eq!((got, code(&answer)), (status, expected), "{answer}");
    }

    // What the key may run, and only that.
    let token = mint(&world, &key, "control:app:read control:resource:write").await;
    let (status, answer) = invoke(
        &api,
        &token,
        json!({"command": "catalog", "subcommand": "describe", "flags": {}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let described: Vec<String> = answer["result"]["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let kind = c["kind"].as_str().unwrap_or("-");
            format!(
                "{} {} {kind}",
                c["command"].as_str().unwrap(),
                c["subcommand"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        described,
        [
            "app list -",
            "app get -",
            "resource create -",
            "resource patch -",
            "state plan application",
            "state verify application",
            "ensure resource -",
            "state apply resource",
        ],
        "{answer}"
    );

    // A write runs through the admin route, which records its change with the key as actor.
    let token = mint(&world, &key, "control:resource:write").await;
    let (_, _, providers) = call(
        &world.api,
        "GET",
        &format!("/v1/zones/{}/providers", world.zone_id),
        Some(&world.writer),
        "",
    )
    .await;
    let provider = providers["items"][0]["id"].as_str().unwrap().to_owned();
    let create = json!({"command": "resource", "subcommand": "create", "authorized_by": "ops@example.com",
        "flags": {"name": "Wiki", "identifier": "resource://wiki", "scopes": ["wiki:read"],
                  "upstream_url": "http://127.0.0.1:9/wiki", "credential_provider_id": provider}});
    let (status, answer) = invoke(&api, &token, create).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let id = answer["result"]["id"].as_str().unwrap();
    let (status, _, resource) = call(
        &world.api,
        "GET",
        &format!("/v1/zones/{}/resources/{id}", world.zone_id),
        Some(&world.writer),
        "",
    )
    .await;
    assert_eq!(
        (status, resource["identifier"].as_str()),
        (StatusCode::OK, Some("resource://wiki"))
    );
    let created: Vec<Value> = crate::test_support::outbox_events(world.shared.store.as_ref())
        .await
        .into_iter()
        .filter(|event| event["metadata_json"]["entity_id"] == id)
        .collect();
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(
        created[0]["metadata_json"]["actor"],
        format!("control:{}", key.0),
        "the resource's creation names the control key"
    );
}

#[tokio::test]
async fn session_and_delegation_commands_run_on_the_coordinators_operator_routes() {
    let world = world().await;
    world.gateway_delegation().await;
    let api = api(&world, true);
    let key = control_key(
        &world,
        &[
            "control:session:read",
            "control:session:write",
            "control:delegation:read",
            "control:delegation:delete",
        ],
    )
    .await;
    let run = async |scope: &str, subcommand: &str, command: &str, id: &str| {
        let token = mint(&world, &key, scope).await;
        let body = json!({"command": command, "subcommand": subcommand, "flags": {"id": id}});
        invoke(&api, &token, body).await
    };
    let (status, answer) = run("control:session:read", "get", "session", "g-source").await;
    assert_eq!(
        (status, answer["result"]["agent_session_id"].as_str()),
        (StatusCode::OK, Some("g-source")),
        "{answer}"
    );
    let (status, answer) = run(
        "control:delegation:read",
        "outbound",
        "delegation",
        "g-source",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer.to_string().contains("g-edge"), "{answer}");
    let (status, answer) = run(
        "control:delegation:read",
        "traverse",
        "delegation",
        "g-edge",
    )
    .await;
    assert_eq!(
        (status, answer["result"][0]["id"].as_str()),
        (StatusCode::OK, Some("g-edge")),
        "{answer}"
    );
    let (status, answer) = run("control:session:write", "suspend", "session", "g-target").await;
    assert_eq!(
        (status, answer["result"]["status"].as_str()),
        (StatusCode::OK, Some("suspended")),
        "{answer}"
    );
    // A read scope does not reach a write route, here either.
    let (status, answer) = run("control:session:read", "resume", "session", "g-target").await;
    assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "denied"));
    let (status, answer) = run("control:session:write", "resume", "session", "g-target").await;
    assert_eq!(
        (status, answer["result"]["status"].as_str()),
        (StatusCode::OK, Some("active")),
        "{answer}"
    );
    let (status, answer) = run(
        "control:delegation:delete",
        "revoke",
        "delegation",
        "g-edge",
    )
    .await;
    assert!(status.is_success(), "{status} {answer}");
    let edge = world
        .shared
        .store
        .get_delegation_edge(&world.zone_id, "g-edge")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(edge.status, "revoked");
    let (status, answer) = run("control:session:read", "get", "session", "nope").await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::NOT_FOUND, "not_found"),
        "{answer}"
    );
    // The Coordinator's change events name the key.
    let actors: Vec<String> = crate::test_support::outbox_events(world.shared.store.as_ref())
        .await
        .into_iter()
        .filter(|event| {
            event["event_type"]
                .as_str()
                .is_some_and(|kind| kind.starts_with("coordinator."))
        })
        .filter_map(|event| event["metadata_json"]["actor"].as_str().map(str::to_owned))
        .collect();
    assert!(!actors.is_empty());
    assert!(
        actors
            .iter()
            .all(|actor| *actor == format!("control:{}", key.0)),
        "{actors:?}"
    );
}

#[tokio::test]
async fn ensure_creates_changes_or_leaves_the_one_object_its_key_names() {
    let world = world().await;
    let api = api(&world, true);
    let key = control_key(&world, &["control:app:write", "control:app:read"]).await;
    let ensure =
        |kind: &str, flags: Value| json!({"command": "ensure", "subcommand": kind, "flags": flags});
    let spec = json!({"name": "ensured", "registration_method": "managed", "traits": ["agent"]});
    let mut seen = Vec::new();
    for (flags, action) in [
        (spec.clone(), "created"),
        (spec.clone(), "unchanged"),
        (
            json!({"name": "ensured", "traits": ["agent", "batch"]}),
            "updated",
        ),
        (
            json!({"name": "ensured", "traits": ["agent", "batch"]}),
            "unchanged",
        ),
    ] {
        let token = mint(&world, &key, "control:app:write").await;
        let (status, answer) = invoke(&api, &token, ensure("application", flags)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["result"]["action"], action, "{answer}");
        seen.push(
            answer["result"]["object"]["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert!(seen.iter().all(|id| *id == seen[0]), "one object: {seen:?}");
    let token = mint(&world, &key, "control:app:read").await;
    let (_, listed) = invoke(
        &api,
        &token,
        json!({"command": "app", "subcommand": "get", "flags": {"id": seen[0]}}),
    )
    .await;
    assert_eq!(
        listed["result"]["traits"],
        json!(["agent", "batch"]),
        "{listed}"
    );

    // What ensure refuses: a kind it does not keep, a missing key flag, an id, a scope the
    // mandate lacks, and whatever the admin route refuses.
    for (scope, flags, kind, status, expected) in [
        (
            "control:app:write",
            json!({"name": "p"}),
            "workload",
            StatusCode::NOT_IMPLEMENTED,
            "unsupported",
        ),
        (
            "control:app:write",
            json!({"traits": []}),
            "application",
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "control:app:write",
            json!({"name": "", "traits": []}),
            "application",
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "control:app:write",
            json!({"name": "x", "id": seen[0]}),
            "application",
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "control:app:read",
            json!({"name": "x"}),
            "application",
            StatusCode::FORBIDDEN,
            "denied",
        ),
        (
            "control:app:write",
            json!({"identifier": "r"}),
            "resource",
            StatusCode::FORBIDDEN,
            "denied",
        ),
        (
            "control:app:write",
            json!({"name": "y", "registration_method": "nope"}),
            "application",
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "control:app:write",
            json!({"name": "ensured", "traits": ["control:invoke"]}),
            "application",
            StatusCode::FORBIDDEN,
            "denied",
        ),
    ] {
        let token = mint(&world, &key, scope).await;
        let (got, answer) = invoke(&api, &token, ensure(kind, flags.clone())).await;
        assert_eq!(
            (got, code(&answer)),
            (status, expected),
            "{flags}: {answer}"
        );
    }
}

#[tokio::test]
async fn a_collection_too_long_to_search_is_a_conflict_not_a_guess() {
    let world = world().await;
    for _ in 0..2 {
        control_key(&world, &[]).await;
    }
    let admin = crate::router::in_process_admin_api(&world.shared);
    let caller = crate::auth::AdminCaller::control_key("key", &world.zone_id, false);
    let admin = super::AdminApi {
        router: &admin,
        caller,
        request_id: None,
    };
    let applications = format!("/v1/zones/{}/applications", world.zone_id);
    let every = super::list_all(&admin, &applications, (1, 100))
        .await
        .unwrap();
    assert!(every.len() >= 3, "{every:?}");
    // One a page: all of them in as many pages, and one page short is refused.
    let (status, answer) = super::list_all(&admin, &applications, (1, every.len() - 1))
        .await
        .unwrap_err();
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(super::admin_refusal(status, &answer).code, "conflict");
    let paged = super::list_all(&admin, &applications, (1, every.len()))
        .await
        .unwrap();
    assert_eq!(paged, every);
}

#[tokio::test]
async fn state_plans_verifies_and_applies_a_document_of_objects() {
    let world = world().await;
    let api = api(&world, true);
    let key = control_key(&world, &["control:app:write", "control:app:read"]).await;
    let state =
        |verb: &str, flags: Value| json!({"command": "state", "subcommand": verb, "flags": flags});
    let app = |name: &str, traits: Value| json!({"kind": "application", "spec": {"name": name, "registration_method": "managed", "traits": traits}});
    let document = json!([app("alpha", json!(["a"])), app("beta", json!([]))]);
    let run = |verb: &'static str, flags: Value, scope: &'static str| {
        let (world, api, key) = (&world, &api, &key);
        async move {
            let token = mint(world, key, scope).await;
            invoke(api, &token, state(verb, flags)).await
        }
    };
    let actions = |answer: &Value| -> Vec<String> {
        answer["result"]["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|object| object["action"].as_str().unwrap().to_owned())
            .collect()
    };

    let (status, planned) = run("plan", json!({"objects": document}), "control:app:read").await;
    assert_eq!(status, StatusCode::OK, "{planned}");
    assert_eq!(actions(&planned), ["create", "create"]);
    let (_, dry) = run(
        "apply",
        json!({"objects": document, "dry_run": true}),
        "control:app:read",
    )
    .await;
    assert_eq!(actions(&dry), ["create", "create"], "{dry}");
    let (_, verified) = run("verify", json!({"objects": document}), "control:app:read").await;
    assert_eq!(verified["result"]["in_sync"], false, "{verified}");

    let (status, applied) = run("apply", json!({"objects": document}), "control:app:write").await;
    assert_eq!(status, StatusCode::OK, "{applied}");
    assert_eq!(actions(&applied), ["created", "created"]);
    let (_, verified) = run("verify", json!({"objects": document}), "control:app:read").await;
    assert_eq!(verified["result"]["in_sync"], true, "{verified}");
    assert_eq!(actions(&verified), ["unchanged", "unchanged"]);

    // One object drifts: the plan names it and its field; apply changes only it.
    let drifted = json!([app("alpha", json!(["a", "b"])), app("beta", json!([]))]);
    let (_, planned) = run("plan", json!({"objects": drifted}), "control:app:read").await;
    assert_eq!(actions(&planned), ["update", "unchanged"]);
    assert_eq!(planned["result"]["objects"][0]["fields"], json!(["traits"]));
    let (_, applied) = run("apply", json!({"objects": drifted}), "control:app:write").await;
    assert_eq!(actions(&applied), ["updated", "unchanged"], "{applied}");
    assert_eq!(
        applied["result"]["objects"][0]["id"],
        verified["result"]["objects"][0]["id"]
    );

    // A refusal part-way names the object and what was done before it.
    let refused = json!([
        app("gamma", json!([])),
        app("delta", json!(["control:invoke"]))
    ]);
    let (status, answer) = run("apply", json!({"objects": refused}), "control:app:write").await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::FORBIDDEN, "denied"),
        "{answer}"
    );
    let reason = answer["error"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("object 1 (application \"delta\")")
            && reason.contains("the 1 before it were done"),
        "{reason}"
    );

    for (verb, flags, scope, status, expected) in [
        (
            "apply",
            json!({"objects": document}),
            "control:app:read",
            StatusCode::FORBIDDEN,
            "denied",
        ),
        (
            "plan",
            json!({"objects": [{"kind": "resource", "spec": {"identifier": "r"}}]}),
            "control:app:read",
            StatusCode::FORBIDDEN,
            "denied",
        ),
        (
            "plan",
            json!({"objects": [{"kind": "workload", "spec": {"name": "p"}}]}),
            "control:app:read",
            StatusCode::NOT_IMPLEMENTED,
            "unsupported",
        ),
        (
            "plan",
            json!({"objects": document, "prune": "yes"}),
            "control:app:read",
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "destroy",
            json!({"objects": document}),
            "control:app:read",
            StatusCode::NOT_IMPLEMENTED,
            "unsupported",
        ),
        (
            "plan",
            json!({}),
            "control:app:read",
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "plan",
            json!({"objects": []}),
            "control:app:read",
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "plan",
            json!({"objects": [app("x", json!([])), app("x", json!(["a"]))]}),
            "control:app:read",
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "plan",
            json!({"objects": [{"kind": "application", "spec": {"traits": []}}]}),
            "control:app:read",
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "plan",
            json!({"objects": [{"kind": "application", "spec": {"name": "x"}, "extra": 1}]}),
            "control:app:read",
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "plan",
            json!({"objects": document, "dry_run": "yes"}),
            "control:app:read",
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "plan",
            json!({"objects": (0..65).map(|n| app(&format!("n{n}"), json!([]))).collect::<Vec<_>>()}),
            "control:app:read",
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
    ] {
        let (got, answer) = run(verb, flags.clone(), scope).await;
        assert_eq!(
            (got, code(&answer)),
            (status, expected),
            "{verb} {flags}: {answer}"
        );
    }
}

#[tokio::test]
async fn state_prunes_unnamed_objects_with_the_delete_scope_and_spares_control_keys() {
    let world = world().await;
    let api = api(&world, true);
    let key = control_key(
        &world,
        &[
            "control:app:read",
            "control:app:write",
            "control:app:delete",
        ],
    )
    .await;
    let run = |verb: &'static str, flags: Value, scope: &'static str| {
        let (world, api, key) = (&world, &api, &key);
        async move {
            let token = mint(world, key, scope).await;
            let body = json!({"command": "state", "subcommand": verb, "flags": flags});
            invoke(api, &token, body).await
        }
    };
    let app = |name: &str| json!({"kind": "application", "spec": {"name": name, "registration_method": "managed", "traits": []}});
    let summary = |answer: &Value| -> Vec<(String, String)> {
        answer["result"]["objects"]
            .as_array()
            .unwrap_or_else(|| panic!("{answer}"))
            .iter()
            .map(|object| {
                let name = object["name"].as_str().unwrap().to_owned();
                (name, object["action"].as_str().unwrap().to_owned())
            })
            .collect()
    };
    let both = json!([app("alpha"), app("beta")]);
    let (status, applied) = run("apply", json!({"objects": both}), "control:app:write").await;
    assert_eq!(status, StatusCode::OK, "{applied}");
    let beta = applied["result"]["objects"][1]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The control key itself is an application of the zone, and no document names it.
    let only_alpha = json!([app("alpha")]);
    let pruning = json!({"objects": only_alpha, "prune": true});
    let (status, planned) = run("plan", pruning.clone(), "control:app:read").await;
    assert_eq!(status, StatusCode::OK, "{planned}");
    let expected = |action: &str| {
        vec![
            ("alpha".into(), "unchanged".into()),
            ("beta".into(), action.into()),
            // The world's own application, which the document does not name either.
            ("billing".into(), action.into()),
        ]
    };
    assert_eq!(summary(&planned), expected("delete"));
    assert_eq!(planned["result"]["objects"][1]["id"], json!(beta));
    let (_, verified) = run("verify", pruning.clone(), "control:app:read").await;
    assert_eq!(verified["result"]["in_sync"], false, "{verified}");
    let (_, verified) = run("verify", json!({"objects": only_alpha}), "control:app:read").await;
    assert_eq!(verified["result"]["in_sync"], true, "{verified}");
    let dry = json!({"objects": only_alpha, "prune": true, "dry_run": true});
    let (_, dry) = run("apply", dry, "control:app:read").await;
    assert_eq!(summary(&dry), expected("delete"));

    // Pruning in apply archives, so it needs the delete scope as well as the write scope.
    let (status, refused) = run("apply", pruning.clone(), "control:app:write").await;
    assert_eq!(
        (status, code(&refused)),
        (StatusCode::FORBIDDEN, "denied"),
        "{refused}"
    );
    let path = format!("/v1/zones/{}/applications?limit=500", world.zone_id);
    let listed = || async {
        let (_, _, page) = call(&world.api, "GET", &path, Some(&world.writer), "").await;
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert!(listed().await.contains(&"beta".to_owned()));

    let (status, pruned) = run(
        "apply",
        pruning.clone(),
        "control:app:write control:app:delete",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{pruned}");
    assert_eq!(summary(&pruned), expected("deleted"));
    let names = listed().await;
    assert!(
        names.contains(&"alpha".to_owned()) && !names.contains(&"beta".to_owned()),
        "{names:?}"
    );
    assert!(
        names.iter().any(|name| name.starts_with("key-")),
        "the control key stays: {names:?}"
    );
    let (_, verified) = run("verify", pruning, "control:app:read").await;
    assert_eq!(verified["result"]["in_sync"], true, "{verified}");
}

#[test]
fn pruning_goes_resources_then_applications_then_providers() {
    let desired =
        |kind: &'static str, collection: &str, key: &'static str, name: &str| super::Desired {
            kind,
            collection: collection.to_owned(),
            key,
            spec: json!({key: name}).as_object().unwrap().clone(),
        };
    let objects = [
        desired("identity-provider", "p", "identifier", "kept-provider"),
        desired("application", "a", "name", "kept-app"),
        desired("resource", "r", "identifier", "kept-resource"),
    ];
    let listed: super::Listed = [
        (
            "p",
            vec![
                json!({"id": "p1", "identifier": "kept-provider"}),
                json!({"id": "p2", "identifier": "old-provider"}),
            ],
        ),
        (
            "a",
            vec![
                json!({"id": "a1", "name": "kept-app", "traits": []}),
                json!({"id": "a2", "name": "old-app", "traits": ["tier:1"]}),
                json!({"id": "a3", "name": "a-key", "traits": ["control:invoke"]}),
                json!({"id": "a4", "name": "a-system", "traits": ["caracal.sys:operator"]}),
            ],
        ),
        (
            "r",
            vec![
                json!({"id": "r2", "identifier": "old-resource"}),
                json!({"id": "r1", "identifier": "kept-resource"}),
            ],
        ),
    ]
    .into_iter()
    .map(|(collection, objects)| (collection.to_owned(), objects))
    .collect();
    let unnamed: Vec<(&str, &str)> = super::unnamed_objects(&objects, &listed)
        .into_iter()
        .map(|(kind, _, _, object)| (kind, object["id"].as_str().unwrap()))
        .collect();
    assert_eq!(
        unnamed,
        [
            ("resource", "r2"),
            ("application", "a2"),
            ("identity-provider", "p2")
        ]
    );
    // A kind the document does not name is never pruned.
    let only_apps = [desired("application", "a", "name", "kept-app")];
    let unnamed = super::unnamed_objects(&only_apps, &listed);
    assert_eq!(unnamed.len(), 1, "{unnamed:?}");
}

#[tokio::test]
async fn control_invocations_refuse_what_the_mandate_does_not_allow() {
    let world = world().await;
    let api = api(&world, true);
    let key = control_key(
        &world,
        &[
            "control:app:read",
            "control:app:write",
            "control:grant:read",
        ],
    )
    .await;
    let app_session = world.bootstrap().await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let read = |command: &str, subcommand: &str, flags: Value| json!({"command": command, "subcommand": subcommand, "flags": flags});
    let mut too_many = serde_json::Map::new();
    for n in 0..=super::MAX_FLAGS {
        too_many.insert(format!("f{n}"), json!(n));
    }
    let cases = [
        // A scope the mandate lacks.
        (
            "control:app:read",
            read("app", "delete", json!({"id": world.app_id})),
            StatusCode::FORBIDDEN,
            "denied",
        ),
        (
            "control:app:read",
            read("zone", "delete", json!({})),
            StatusCode::NOT_IMPLEMENTED,
            "unsupported",
        ),
        (
            "control:app:read",
            read("app", "get", json!({})),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "control:app:read",
            read("app", "get", json!({"id": "../../admin-tokens"})),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "control:app:read",
            read("app", "list", Value::Object(too_many)),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "control:app:read",
            read("app", "list", json!({"limit": {"deep": 1}})),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "control:app:read",
            json!({"command": "app"}),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        // The admin route's own refusals keep their meaning.
        (
            "control:app:read",
            read("app", "get", json!({"id": "nope"})),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "control:app:read",
            read("app", "list", json!({"limit": 0})),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        // A zone-confined caller cannot give out control traits...
        (
            "control:app:write",
            read(
                "app",
                "create",
                json!({"name": "x", "registration_method": "managed", "traits": ["control:invoke"]}),
            ),
            StatusCode::FORBIDDEN,
            "denied",
        ),
        // ...nor take over a control key (its own here) by rotating its secret.
        (
            "control:app:write",
            read("app", "rotate-secret", json!({"id": key.0})),
            StatusCode::FORBIDDEN,
            "denied",
        ),
        // ...or by changing it.
        (
            "control:app:write",
            read(
                "app",
                "patch",
                json!({"id": key.0, "client_secret": "x".repeat(40)}),
            ),
            StatusCode::FORBIDDEN,
            "denied",
        ),
    ];
    let recorded_before = control_events(&world).await.len();
    for (scope, body, status, expected) in &cases {
        let token = mint(&world, &key, scope).await;
        let (got, answer) = invoke(&api, &token, body.clone()).await;
        assert_eq!(
            (got, code(&answer)),
            (*status, *expected),
            "{body}: {answer}"
        );
        assert_eq!(answer["ok"], false);
    }
    // Each refusal after the mandate checked out is on the record: who, what, and why. The five
    // the admin route refused were allowed (and recorded so) before they ran.
    let (denials, allowed): (Vec<Value>, Vec<Value>) = control_events(&world)
        .await
        .split_off(recorded_before)
        .into_iter()
        .partition(|event| event["decision"] == "deny");
    assert_eq!(denials.len(), cases.len());
    assert_eq!(allowed.len(), 5);
    for (event, (_, body, _, expected)) in denials.iter().zip(&cases) {
        assert_eq!(event["decision"], "deny", "{event}");
        assert_eq!(event["diagnostics_json"][0]["code"], *expected, "{event}");
        assert_eq!(
            event["metadata_json"]["actor"],
            format!("control:{}", key.0)
        );
        // A body that is no invocation names no command.
        let command = if body.get("subcommand").is_some() {
            &body["command"]
        } else {
            &Value::Null
        };
        assert_eq!(&event["metadata_json"]["command"], command, "{event}");
    }
    assert_eq!(denials[0]["metadata_json"]["subcommand"], "delete");
    assert_eq!(denials[0]["zone_id"], world.zone_id.as_str());
    // A plain application may be rotated: the guard is about control keys only.
    let token = mint(&world, &key, "control:app:write").await;
    let (status, answer) = invoke(
        &api,
        &token,
        read("app", "rotate-secret", json!({"id": world.app_id})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    // Another zone named in the header.
    let token = mint(&world, &key, "control:grant:read").await;
    let (status, _, answer) = call_with(
        &api,
        "POST",
        "/v1/control/invoke",
        &[
            ("authorization", &format!("Bearer {token}")),
            ("x-caracal-zone-scope", "another-zone"),
        ],
        &read("grant", "list", json!({})).to_string(),
    )
    .await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::CONFLICT, "zone_mismatch")
    );

    // Bearers that are not a live control mandate: refused, and logged, but with no key to
    // name and no zone to file it under, not an audit event.
    let recorded_before = control_events(&world).await.len();
    for bearer in [
        None,
        Some("garbage".to_owned()),
        Some(world.writer.clone()),
        Some(app_session),
    ] {
        let (status, _, answer) = call(
            &api,
            "POST",
            "/v1/control/invoke",
            bearer.as_deref(),
            &read("app", "list", json!({})).to_string(),
        )
        .await;
        assert_eq!(
            (status, code(&answer)),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "{bearer:?}: {answer}"
        );
    }
    assert_eq!(control_events(&world).await.len(), recorded_before);
    // A scope taken off the key after the mint is gone at once.
    let token = mint(&world, &key, "control:grant:read").await;
    let (status, _, _) = call(
        &world.api,
        "PATCH",
        &format!("/v1/zones/{}/applications/{}", world.zone_id, key.0),
        Some(&world.writer),
        &json!({"traits": ["control:invoke", "control:scope:control:app:read"]}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = invoke(&api, &token, read("grant", "list", json!({}))).await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::UNAUTHORIZED, "unauthorized"),
        "{answer}"
    );
    // An archived key is refused at once, with a mandate minted before.
    let token = mint(&world, &key, "control:app:read").await;
    let (status, _, _) = call(
        &world.api,
        "DELETE",
        &format!("/v1/zones/{}/applications/{}", world.zone_id, key.0),
        Some(&world.writer),
        "",
    )
    .await;
    assert!(status.is_success(), "{status}");
    let (status, answer) = invoke(&api, &token, read("app", "list", json!({}))).await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::UNAUTHORIZED, "unauthorized"),
        "{answer}"
    );
}

#[tokio::test]
async fn control_invocations_fail_closed() {
    let world = world().await;
    let key = control_key(
        &world,
        &["control:app:read", "control:identity-provider:write"],
    )
    .await;
    let list = json!({"command": "app", "subcommand": "list"});

    // Off unless the operator turns it on.
    let token = mint(&world, &key, "control:app:read").await;
    let (status, answer) = invoke(&api(&world, false), &token, list.clone()).await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::SERVICE_UNAVAILABLE, "control_disabled")
    );

    // The store down: nothing runs.
    let api = api(&world, true);
    let token = mint(&world, &key, "control:app:read").await;
    world.store.down.store(true, Ordering::SeqCst);
    let (status, answer) = invoke(&api, &token, list.clone()).await;
    world.store.down.store(false, Ordering::SeqCst);
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        "{answer}"
    );

    // An incident containment: a freeze refuses changes as the admin route does; failing the
    // zone closed refuses a mandate minted before the switch. Its refused change is the first
    // the key's budget counts, so all of that budget's steps must fall in one minute.
    crate::test_support::budget_minute_ahead(20).await;
    let incident = |path: &'static str, body: Value| {
        let api = world.api.clone();
        let writer = world.writer.clone();
        async move {
            let (status, _, state) =
                call(&api, "POST", path, Some(&writer), &body.to_string()).await;
            assert_eq!(status, StatusCode::OK, "{state}");
        }
    };
    incident(
        "/v1/incident/contain",
        json!({"freeze": true, "reason": "drill"}),
    )
    .await;
    let token = mint(&world, &key, "control:identity-provider:write").await;
    let create = json!({"command": "identity-provider", "subcommand": "create",
                        "flags": {"name": "frozen", "kind": "none"}});
    let (status, answer) = invoke(&api, &token, create).await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::LOCKED, "change_freeze"),
        "{answer}"
    );
    let token = mint(&world, &key, "control:app:read").await;
    let zone = world.zone_id.clone();
    incident(
        "/v1/incident/contain",
        json!({"fail_closed": true, "zone_id": zone, "reason": "drill"}),
    )
    .await;
    let (status, answer) = invoke(&api, &token, list.clone()).await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::SERVICE_UNAVAILABLE, "contained")
    );
    incident(
        "/v1/incident/release",
        json!({"freeze": true, "fail_closed": true, "zone_id": zone, "reason": "over"}),
    )
    .await;

    // Past the key's budget: 429. One invocation above counted already: the frozen change
    // (containment refuses before the budget, the store-down one before authentication).
    let mut last = (StatusCode::OK, Value::Null);
    for _ in 1..=super::INVOKES_PER_MINUTE {
        let token = mint(&world, &key, "control:app:read").await;
        last = invoke(&api, &token, list.clone()).await;
    }
    assert_eq!(
        (last.0, code(&last.1)),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        "{}",
        last.1
    );

    // Evidence lost: refused before anything runs.
    let (evidence, _lost) = crate::test_support::lost_evidence().await;
    let mut shared = world.shared.clone();
    shared.evidence = evidence;
    let mut state = RoleState::new(Role::Api, shared);
    state.control = Some(Control::new(true, ISSUER.to_owned()));
    let token = mint(&world, &key, "control:app:read").await;
    let (status, answer) = invoke(&router(state), &token, list).await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::INTERNAL_SERVER_ERROR, "audit_unavailable")
    );
}

mod parsing {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::super::{CATALOG, ENSURED, Invocation, prepare};
    use crate::wire::MandateClaims;

    fn claims() -> MandateClaims {
        let every_scope: Vec<String> = ["read", "write", "delete"]
            .iter()
            .flat_map(|class| {
                CATALOG
                    .iter()
                    .map(move |entry| format!("control:{}:{class}", entry.command))
            })
            .collect();
        MandateClaims {
            aud: vec!["caracal-control".into()],
            zone_id: "zone-1".into(),
            use_: "resource".into(),
            scope: Some(every_scope.join(" ")),
            ..crate::test_support::claims()
        }
    }

    /// Text a hostile caller might send: path tricks, encodings, separators, other scripts.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("../admin-tokens".to_owned()),
            Just("..".to_owned()),
            Just(".".to_owned()),
            Just("x/../../v1/admin-tokens".to_owned()),
            Just("%2e%2e".to_owned()),
            Just("a?b=c#d".to_owned()),
            Just("01a22b7f-d577-71b3-aede-6769f4c46f4c".to_owned()),
            Just(String::new()),
            "[a-z:._-]{1,12}",
            any::<String>(),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            text().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            Just(Value::Null),
        ];
        leaf.prop_recursive(3, 80, 70, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..70).prop_map(Value::Array),
                proptest::collection::btree_map(text(), inner, 0..4)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    fn invocation() -> impl Strategy<Value = Invocation> {
        let command = prop_oneof![
            proptest::sample::select(CATALOG.iter().map(|e| e.command).collect::<Vec<_>>())
                .prop_map(str::to_owned),
            Just("ensure".to_owned()),
            Just("state".to_owned()),
            Just("catalog".to_owned()),
            text(),
        ];
        let subcommand = prop_oneof![
            proptest::sample::select(CATALOG.iter().map(|e| e.subcommand).collect::<Vec<_>>())
                .prop_map(str::to_owned),
            proptest::sample::select(ENSURED.iter().map(|(kind, ..)| *kind).collect::<Vec<_>>())
                .prop_map(str::to_owned),
            proptest::sample::select(vec!["plan", "verify", "apply", "describe"])
                .prop_map(str::to_owned),
            text(),
        ];
        let flags = proptest::collection::btree_map(text(), value(), 0..36);
        let id = proptest::option::of(prop_oneof![text().prop_map(Value::from), value()]);
        let authorized_by =
            proptest::option::of(prop_oneof!["[a-z@.]{1,20}".prop_map(|by| by), text()]);
        (command, subcommand, flags, id, authorized_by).prop_map(
            |(command, subcommand, flags, id, authorized_by)| {
                let mut flags: Map<String, Value> = flags.into_iter().collect();
                if let Some(id) = id {
                    flags.insert("id".to_owned(), id);
                }
                Invocation {
                    command,
                    subcommand,
                    flags,
                    authorized_by,
                    co_author_operator: None,
                }
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3_000))]

        /// Whatever the invocation, the call stays on a catalog route of the key's own zone,
        /// with a plain id in it, or is refused with a 4xx or 501; never a panic.
        #[test]
        fn an_invocation_resolves_to_its_zones_catalog_route_or_a_refusal(invocation in invocation()) {
            let claims = claims();
            match prepare(&http::HeaderMap::new(), &claims, &invocation) {
                Ok(call) if invocation.command == "catalog" => {
                    prop_assert!(matches!(call.work, super::super::Work::Describe(_)) && !call.writes);
                }
                Ok(call) if invocation.command == "state" => {
                    let super::super::Work::State { objects, .. } = call.work else {
                        panic!("a state call carries its objects");
                    };
                    prop_assert!(!objects.is_empty() && objects.len() <= super::super::MAX_FLAG_ITEMS);
                    for desired in objects {
                        let (_, entry, key) = ENSURED.iter().find(|(kind, ..)| *kind == desired.kind).expect("a kind ensure keeps");
                        prop_assert_eq!(desired.collection, format!("/v1/zones/zone-1/{}", entry.path));
                        prop_assert_eq!(desired.key, *key);
                    }
                }
                Ok(call) if invocation.command == "ensure" => {
                    let (_, entry, key) = ENSURED
                        .iter()
                        .find(|(kind, ..)| *kind == invocation.subcommand)
                        .expect("only the kinds ensure keeps resolve");
                    let super::super::Work::Ensure(desired) = call.work else {
                        panic!("an ensure call carries its spec");
                    };
                    prop_assert_eq!(desired.collection, format!("/v1/zones/zone-1/{}", entry.path));
                    prop_assert_eq!(desired.key, *key);
                    prop_assert!(desired.spec.get(*key).and_then(Value::as_str).is_some_and(|v| !v.is_empty()));
                }
                Ok(call) => {
                    let super::super::Work::Route { path, .. } = call.work else {
                        panic!("a catalog command is one request");
                    };
                    let path = path.split('?').next().unwrap_or_default();
                    let entry = CATALOG
                        .iter()
                        .find(|e| e.command == invocation.command && e.subcommand == invocation.subcommand)
                        .expect("only catalog commands resolve");
                    let id = invocation.flags.get("id").and_then(Value::as_str).unwrap_or_default();
                    prop_assert!(id.is_empty() || caracal_core::is_plain_id(id));
                    let route = entry.path.replace("{id}", id);
                    let expected = if route.starts_with('/') {
                        route
                    } else if entry.coordinator {
                        format!("/zones/zone-1/{route}")
                    } else {
                        format!("/v1/zones/zone-1/{route}")
                    };
                    prop_assert_eq!(path.to_owned(), expected);
                    prop_assert!(!path.contains(".."));
                    prop_assert!(invocation.flags.len() <= super::super::MAX_FLAGS);
                }
                Err(refusal) => {
                    prop_assert!(
                        refusal.status.is_client_error() || refusal.status == http::StatusCode::NOT_IMPLEMENTED,
                        "{:?}", refusal
                    );
                }
            }
        }
    }
}

/// A policy data document with one binding.
fn policy_document(binding: &str) -> String {
    format!(
        "# caracal:data-document\npackage caracal.authz\nimport rego.v1\napp_ids := {{\"{binding}\": \"b\"}}\n"
    )
}

#[tokio::test]
async fn ensure_keeps_a_policy_by_its_content_and_a_set_by_its_policies_latest_versions() {
    let world = world().await;
    let api = api(&world, true);
    let scopes = [
        "control:policy:read",
        "control:policy:write",
        "control:policy-set:read",
        "control:policy-set:write",
    ];
    let key = control_key(&world, &scopes).await;
    let all = scopes.join(" ");
    let ensure = |kind: &'static str, flags: Value, scope: String| {
        let (world, api, key) = (&world, &api, &key);
        async move {
            let token = mint(world, key, &scope).await;
            let body = json!({"command": "ensure", "subcommand": kind, "flags": flags});
            invoke(api, &token, body).await
        }
    };

    let policy = |content: String| json!({"name": "grants-a", "content": content});
    let mut versions = Vec::new();
    for (content, action) in [
        (policy_document("one"), "created"),
        (policy_document("one"), "unchanged"),
        (policy_document("two"), "updated"),
        (policy_document("two"), "unchanged"),
    ] {
        let (status, answer) = ensure("policy", policy(content), all.clone()).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["result"]["action"], action, "{answer}");
        versions.push(answer["result"]["object"]["version"].clone());
    }
    assert_eq!(versions, [json!(1), json!(1), json!(2), json!(2)]);
    let (_, policy_now) = ensure("policy", policy(policy_document("two")), all.clone()).await;
    let latest = policy_now["result"]["object"]["version_id"].clone();

    // A set naming it is created with a version of its latest and activated; then left.
    let set = json!({"name": "main", "policies": ["grants-a"], "active": true});
    let (status, created) = ensure("policy-set", set.clone(), all.clone()).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert_eq!(created["result"]["action"], "created", "{created}");
    let set_id = created["result"]["object"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let active = created["result"]["object"]["active_version_id"].clone();
    assert!(active.is_string(), "{created}");
    let token = mint(&world, &key, "control:policy-set:read").await;
    let (_, versions) = invoke(
        &api,
        &token,
        json!({"command": "policy-set", "subcommand": "get", "flags": {"id": set_id}}),
    )
    .await;
    assert_eq!(versions["result"]["active_version_id"], active);
    let manifest = crate::test_support::call(
        &world.api,
        "GET",
        &format!(
            "/v1/zones/{}/policy-sets/{set_id}/versions/{}",
            world.zone_id,
            active.as_str().unwrap()
        ),
        Some(&world.writer),
        "",
    )
    .await
    .2;
    assert_eq!(
        manifest["manifest"],
        json!([{"policy_version_id": latest}]),
        "{manifest}"
    );
    let (_, again) = ensure("policy-set", set.clone(), all.clone()).await;
    assert_eq!(again["result"]["action"], "unchanged", "{again}");

    // The policy moves on: the set gets a version of it, activated.
    ensure("policy", policy(policy_document("three")), all.clone()).await;
    let (_, moved) = ensure("policy-set", set.clone(), all.clone()).await;
    assert_eq!(moved["result"]["action"], "updated", "{moved}");
    assert_ne!(moved["result"]["object"]["active_version_id"], active);
    let (_, again) = ensure("policy-set", set.clone(), all.clone()).await;
    assert_eq!(again["result"]["action"], "unchanged", "{again}");

    // A set left inactive is compared with its latest version: ensuring it twice adds one.
    let spare = json!({"name": "spare", "policies": ["grants-a"]});
    let (_, first) = ensure("policy-set", spare.clone(), all.clone()).await;
    assert_eq!(first["result"]["action"], "created", "{first}");
    assert!(first["result"]["object"]["active_version_id"].is_null());
    let (_, second) = ensure("policy-set", spare, all.clone()).await;
    assert_eq!(second["result"]["action"], "unchanged", "{second}");

    // What ensure refuses for these kinds.
    for (flags, kind, scope, status, expected) in [
        (
            json!({"name": "grants-a", "content": policy_document("three"), "description": "new"}),
            "policy",
            all.clone(),
            StatusCode::CONFLICT,
            "conflict",
        ),
        (
            json!({"name": "p", "content": 7}),
            "policy",
            all.clone(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            json!({"name": "p", "content": "x", "owner": "me"}),
            "policy",
            all.clone(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            json!({"name": "broken", "content": "package nope"}),
            "policy",
            all.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
        ),
        (
            json!({"name": "main", "policies": ["grants-a"], "active": false}),
            "policy-set",
            all.clone(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            json!({"name": "main", "policies": ["grants-a", "grants-a"]}),
            "policy-set",
            all.clone(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            json!({"name": "main", "policies": []}),
            "policy-set",
            all.clone(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            json!({"name": "other", "policies": ["no-such-policy"]}),
            "policy-set",
            all.clone(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        // A set's spec reads policies: that needs their read scope too.
        (
            json!({"name": "main", "policies": ["grants-a"]}),
            "policy-set",
            "control:policy-set:write".to_owned(),
            StatusCode::FORBIDDEN,
            "denied",
        ),
        (
            json!({"name": "p", "content": policy_document("x")}),
            "policy",
            "control:policy:read".to_owned(),
            StatusCode::FORBIDDEN,
            "denied",
        ),
    ] {
        let (got, answer) = ensure(kind, flags.clone(), scope).await;
        assert_eq!(
            (got, code(&answer)),
            (status, expected),
            "{flags}: {answer}"
        );
    }
    // Nothing was created by the refusals.
    let token = mint(&world, &key, "control:policy-set:read").await;
    let (_, sets) = invoke(
        &api,
        &token,
        json!({"command": "policy-set", "subcommand": "list", "flags": {}}),
    )
    .await;
    let names: Vec<&str> = sets["result"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|set| set["name"].as_str())
        .collect();
    assert!(!names.contains(&"other"), "{names:?}");
}

#[tokio::test]
async fn state_keeps_policies_before_the_sets_that_name_them() {
    let world = world().await;
    let api = api(&world, true);
    let scopes = [
        "control:policy:read",
        "control:policy:write",
        "control:policy:delete",
        "control:policy-set:read",
        "control:policy-set:write",
        "control:policy-set:delete",
    ];
    let key = control_key(&world, &scopes).await;
    let all = scopes.join(" ");
    let run = |verb: &'static str, flags: Value| {
        let (world, api, key, all) = (&world, &api, &key, &all);
        async move {
            let token = mint(world, key, all).await;
            let body = json!({"command": "state", "subcommand": verb, "flags": flags});
            invoke(api, &token, body).await
        }
    };
    let report = |answer: &Value| -> Vec<(String, String, Value)> {
        answer["result"]["objects"]
            .as_array()
            .unwrap_or_else(|| panic!("{answer}"))
            .iter()
            .map(|object| {
                (
                    object["name"].as_str().unwrap().to_owned(),
                    object["action"].as_str().unwrap().to_owned(),
                    object["fields"].clone(),
                )
            })
            .collect()
    };
    let document = |content: String| {
        json!([
            {"kind": "policy", "spec": {"name": "grants", "content": content}},
            {"kind": "policy-set", "spec": {"name": "zone-set", "policies": ["grants"], "active": true}},
        ])
    };

    let (status, planned) = run("plan", json!({"objects": document(policy_document("a"))})).await;
    assert_eq!(status, StatusCode::OK, "{planned}");
    let actions: Vec<String> = report(&planned).into_iter().map(|(_, a, _)| a).collect();
    assert_eq!(actions, ["create", "create"]);
    let (status, applied) = run("apply", json!({"objects": document(policy_document("a"))})).await;
    assert_eq!(status, StatusCode::OK, "{applied}");
    let actions: Vec<String> = report(&applied).into_iter().map(|(_, a, _)| a).collect();
    assert_eq!(actions, ["created", "created"]);
    let (_, verified) = run("verify", json!({"objects": document(policy_document("a"))})).await;
    assert_eq!(verified["result"]["in_sync"], true, "{verified}");

    // The policy's content drifts: the plan names its content and the set's policies (its
    // next version is not made yet), and apply makes both.
    let drifted = document(policy_document("b"));
    let (_, planned) = run("plan", json!({"objects": drifted})).await;
    assert_eq!(
        report(&planned),
        [
            ("grants".to_owned(), "update".to_owned(), json!(["content"])),
            (
                "zone-set".to_owned(),
                "update".to_owned(),
                json!(["policies"])
            ),
        ]
    );
    let (_, applied) = run("apply", json!({"objects": drifted})).await;
    let actions: Vec<String> = report(&applied).into_iter().map(|(_, a, _)| a).collect();
    assert_eq!(actions, ["updated", "updated"], "{applied}");
    let (_, verified) = run("verify", json!({"objects": drifted})).await;
    assert_eq!(verified["result"]["in_sync"], true, "{verified}");

    // A set listed before a policy it names is refused before anything runs.
    let reversed = json!([drifted[1], drifted[0]]);
    let (status, answer) = run("apply", json!({"objects": reversed})).await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::BAD_REQUEST, "invalid"),
        "{answer}"
    );

    // Pruning archives the sets and policies the document does not name (the world's own
    // grants policy and its set, no longer active), sets first; the active set stays.
    let (_, planned) = run("plan", json!({"objects": drifted, "prune": true})).await;
    let pruned: Vec<(String, String)> = report(&planned)
        .into_iter()
        .filter(|(_, action, _)| action == "delete")
        .map(|(name, action, _)| (name, action))
        .collect();
    assert!(!pruned.is_empty(), "{planned}");
    let kinds: Vec<&str> = planned["result"]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|object| object["action"] == "delete")
        .map(|object| object["kind"].as_str().unwrap())
        .collect();
    let first_policy = kinds.iter().position(|kind| *kind == "policy");
    let last_set = kinds.iter().rposition(|kind| *kind == "policy-set");
    assert!(
        first_policy.is_some() && last_set.is_none_or(|last| Some(last) < first_policy),
        "{kinds:?}"
    );
    let (status, applied) = run("apply", json!({"objects": drifted, "prune": true})).await;
    assert_eq!(status, StatusCode::OK, "{applied}");
    let (_, verified) = run("verify", json!({"objects": drifted, "prune": true})).await;
    assert_eq!(verified["result"]["in_sync"], true, "{verified}");
}

#[test]
fn pruning_spares_the_active_policy_set_and_goes_sets_then_policies() {
    let desired = |kind: &'static str, collection: &str, name: &str| super::Desired {
        kind,
        collection: collection.to_owned(),
        key: "name",
        spec: json!({"name": name}).as_object().unwrap().clone(),
    };
    let objects = [
        desired("policy", "p", "kept-policy"),
        desired("policy-set", "s", "kept-set"),
    ];
    let listed: super::Listed = [
        (
            "p".to_owned(),
            vec![
                json!({"id": "p1", "name": "kept-policy"}),
                json!({"id": "p2", "name": "old-policy"}),
            ],
        ),
        (
            "s".to_owned(),
            vec![
                json!({"id": "s1", "name": "kept-set", "active_version_id": null}),
                json!({"id": "s2", "name": "active-set", "active_version_id": "v1"}),
                json!({"id": "s3", "name": "old-set", "active_version_id": null}),
            ],
        ),
    ]
    .into_iter()
    .collect();
    let unnamed: Vec<(&str, &str)> = super::unnamed_objects(&objects, &listed)
        .into_iter()
        .map(|(kind, _, _, object)| (kind, object["id"].as_str().unwrap()))
        .collect();
    assert_eq!(unnamed, [("policy-set", "s3"), ("policy", "p2")]);
}
