use caracal_core::Role;
use caracal_store::TokenScope;
use http::StatusCode;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::router::router;
use crate::test_support::{call, role_state, token};

fn code(body: &Value) -> Option<&str> {
    body["error"].as_str()
}

/// The audit events waiting in the outbox, oldest first: (event type, the whole event).
async fn audit_outbox(shared: &crate::state::Shared) -> Vec<(String, String)> {
    shared
        .store
        .claim_outbox("test", 1000, std::time::Duration::from_secs(60))
        .await
        .unwrap()
        .iter()
        .filter(|row| row.stream == caracal_bus::stream_names::AUDIT_EVENTS)
        .map(|row| {
            let event: Value = serde_json::from_str(&row.fields["data"]).unwrap();
            let event_type = event["event_type"].as_str().unwrap().to_owned();
            (event_type, row.fields["data"].clone())
        })
        .collect()
}

fn types(events: &[(String, String)]) -> Vec<&str> {
    events
        .iter()
        .map(|(event_type, _)| event_type.as_str())
        .collect()
}

#[tokio::test]
async fn zones_are_created_listed_renamed_and_archived_with_strict_bodies() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let reader = token(&shared, "read", TokenScope::Global).await;
    let app = router(state);
    let w = Some(writer.as_str());

    let (status, _, first) = call(&app, "POST", "/v1/zones", w, r#"{"name":"Payments EU"}"#).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["slug"], "payments-eu");
    assert_eq!(first["dcr_enabled"], false);
    assert!(first["created_at"].as_str().unwrap().ends_with('Z'));
    let (_, _, second) = call(&app, "POST", "/v1/zones", w, r#"{"name":"payments  eu!"}"#).await;
    assert_eq!(
        second["slug"], "payments-eu-2",
        "derived slugs are made unique"
    );

    // Bad input: each refused with its code, nothing stored.
    for (body, status, expected) in [
        ("{not json", StatusCode::BAD_REQUEST, "invalid_body"),
        (
            r#"{"name":"x","colour":"red"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (r#"{"name":42}"#, StatusCode::BAD_REQUEST, "invalid_body"),
        (r#"{"name":"   "}"#, StatusCode::BAD_REQUEST, "invalid_body"),
        (
            r#"{"name":"x","slug":"Not A Slug"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            r#"{"name":"x","slug":"caracal-sys-x"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            r#"{"name":"x","dcr_enabled":"yes"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            r#"{"name":"x","slug":"payments-eu"}"#,
            StatusCode::CONFLICT,
            "zone_slug_conflict",
        ),
    ] {
        let (got, _, answer) = call(&app, "POST", "/v1/zones", w, body).await;
        assert_eq!(
            (got, code(&answer)),
            (status, Some(expected)),
            "{body}: {answer}"
        );
    }
    let (_, _, unknown) = call(&app, "POST", "/v1/zones", w, r#"{"name":"x","colour":1}"#).await;
    assert!(
        unknown["details"]["issues"][0]["message"]
            .as_str()
            .unwrap()
            .contains("colour")
    );
    let oversize = format!(r#"{{"name":"{}"}}"#, "x".repeat(super::MAX_BODY));
    let (got, _, answer) = call(&app, "POST", "/v1/zones", w, &oversize).await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    let (_, _, listed) = call(&app, "GET", "/v1/zones", w, "").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2, "{listed}");

    // Pages, newest first, with an opaque cursor.
    let (_, _, page_one) = call(&app, "GET", "/v1/zones?limit=1", Some(&reader), "").await;
    assert_eq!(page_one["items"][0]["id"], second["id"]);
    let cursor = page_one["next_cursor"].as_str().unwrap();
    let (_, _, page_two) = call(
        &app,
        "GET",
        &format!("/v1/zones?limit=1&cursor={cursor}"),
        Some(&reader),
        "",
    )
    .await;
    assert_eq!(page_two["items"][0]["id"], first["id"]);
    assert_eq!(page_two["next_cursor"], Value::Null);
    for query in ["limit=0", "limit=501", "cursor=garbage", "colour=red"] {
        let (got, _, _) = call(&app, "GET", &format!("/v1/zones?{query}"), w, "").await;
        assert_eq!(got, StatusCode::BAD_REQUEST, "{query}");
    }

    // A read token reads but changes nothing.
    let (got, _, answer) = call(&app, "POST", "/v1/zones", Some(&reader), r#"{"name":"y"}"#).await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::FORBIDDEN, Some("admin_token_read_only"))
    );

    let id = first["id"].as_str().unwrap();
    let path = format!("/v1/zones/{id}");
    let (status, _, renamed) = call(&app, "PATCH", &path, w, r#"{"name":"Payments"}"#).await;
    assert_eq!(
        (status, renamed["name"].as_str()),
        (StatusCode::OK, Some("Payments"))
    );
    assert_eq!(
        renamed["slug"], "payments-eu",
        "an omitted field keeps its value"
    );
    let (got, _, answer) = call(&app, "PATCH", &path, w, r#"{"slug":"payments-eu-2"}"#).await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::CONFLICT, Some("zone_slug_conflict"))
    );
    let (got, _, _) = call(&app, "DELETE", &path, w, "").await;
    assert_eq!(got, StatusCode::NO_CONTENT);
    for method in ["GET", "PATCH", "DELETE"] {
        let (got, _, answer) = call(&app, method, &path, w, r#"{"name":"z"}"#).await;
        assert_eq!(
            (got, code(&answer)),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{method}"
        );
    }
    let (_, _, listed) = call(&app, "GET", "/v1/zones", w, "").await;
    assert_eq!(
        listed["items"].as_array().unwrap().len(),
        1,
        "archived zones are not listed"
    );

    // Every change carried its audit event in its own transaction; refused ones left none.
    assert_eq!(
        types(&audit_outbox(&shared).await),
        [
            "admin.zone.create",
            "admin.zone.create",
            "admin.zone.update",
            "admin.zone.archive"
        ]
    );
}

#[tokio::test]
async fn a_zone_token_sees_and_changes_only_its_zone() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let app = router(state);
    let (_, _, mine) = call(
        &app,
        "POST",
        "/v1/zones",
        Some(&writer),
        r#"{"name":"mine"}"#,
    )
    .await;
    let (_, _, theirs) = call(
        &app,
        "POST",
        "/v1/zones",
        Some(&writer),
        r#"{"name":"theirs"}"#,
    )
    .await;
    let mine_id = mine["id"].as_str().unwrap();
    let zone_token = token(&shared, "write", TokenScope::Zone(mine_id.to_owned())).await;
    let z = Some(zone_token.as_str());
    let (_, _, listed) = call(&app, "GET", "/v1/zones", z, "").await;
    let ids: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|zone| zone["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [mine_id]);
    let theirs_path = format!("/v1/zones/{}", theirs["id"].as_str().unwrap());
    let (got, _, answer) = call(&app, "GET", &theirs_path, z, "").await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::FORBIDDEN, Some("admin_token_zone_mismatch"))
    );
    let (got, _, _) = call(&app, "POST", "/v1/zones", z, r#"{"name":"more"}"#).await;
    assert_eq!(
        got,
        StatusCode::FORBIDDEN,
        "only a global token creates zones"
    );
    let (got, _, _) = call(&app, "GET", "/v1/admin-tokens", z, "").await;
    assert_eq!(
        got,
        StatusCode::FORBIDDEN,
        "only a global token manages tokens"
    );
    let apps = format!("/v1/zones/{mine_id}/applications");
    let (got, _, answer) = call(
        &app,
        "POST",
        &apps,
        z,
        r#"{"name":"ctl","registration_method":"managed","traits":["control:invoke"]}"#,
    )
    .await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::FORBIDDEN, Some("admin_token_zone_mismatch")),
        "privileged traits need a global token"
    );
}

#[tokio::test]
async fn application_secrets_are_shown_once_stored_hashed_and_rotated() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let app = router(state);
    let w = Some(writer.as_str());
    let (_, _, zone) = call(&app, "POST", "/v1/zones", w, r#"{"name":"z1"}"#).await;
    let (_, _, other_zone) = call(&app, "POST", "/v1/zones", w, r#"{"name":"z2"}"#).await;
    let zone_id = zone["id"].as_str().unwrap();
    let apps = format!("/v1/zones/{zone_id}/applications");

    let (status, _, created) = call(
        &app,
        "POST",
        &apps,
        w,
        r#"{"name":"Billing","registration_method":"managed","traits":["tier:gold"]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["client_secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("cs_") && secret.len() == 46, "{secret}");
    let id = created["id"].as_str().unwrap();
    let stored = shared
        .store
        .get_application(zone_id, id)
        .await
        .unwrap()
        .unwrap();
    let hash = stored.client_secret_hash.unwrap();
    assert!(!hash.contains(&secret) && caracal_crypto::verify_secret(&secret, &hash));

    let one = format!("{apps}/{id}");
    let (_, _, read) = call(&app, "GET", &one, w, "").await;
    assert_eq!(read.get("client_secret"), None, "shown once");
    assert_eq!(
        (
            read["expires_at"].clone(),
            read["registration_method"].clone()
        ),
        (Value::Null, json!("managed"))
    );
    let (_, _, listed) = call(&app, "GET", &apps, w, "").await;
    assert_eq!(listed["items"][0]["name"], "Billing");
    assert_eq!(listed["items"][0].get("client_secret"), None);

    for (body, status, expected) in [
        (
            r#"{"name":"billing","registration_method":"managed"}"#,
            StatusCode::CONFLICT,
            "application_name_conflict",
        ),
        (
            r#"{"name":"x","registration_method":"dcr"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (r#"{"name":"x"}"#, StatusCode::BAD_REQUEST, "invalid_body"),
        (
            r#"{"name":"x","registration_method":"managed","traits":["9bad"]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            r#"{"name":"x","registration_method":"managed","traits":["a","a"]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
    ] {
        let (got, _, answer) = call(&app, "POST", &apps, w, body).await;
        assert_eq!(
            (got, code(&answer)),
            (status, Some(expected)),
            "{body}: {answer}"
        );
    }

    // PATCH: a short secret is refused and changes nothing; a good one replaces the hash.
    let (got, _, answer) = call(&app, "PATCH", &one, w, r#"{"client_secret":"short"}"#).await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::BAD_REQUEST, Some("invalid_body"))
    );
    let unchanged = shared
        .store
        .get_application(zone_id, id)
        .await
        .unwrap()
        .unwrap();
    assert!(caracal_crypto::verify_secret(
        &secret,
        unchanged.client_secret_hash.as_deref().unwrap()
    ));
    let chosen = "k".repeat(40);
    let (got, _, patched) = call(
        &app,
        "PATCH",
        &one,
        w,
        &json!({"client_secret": chosen, "traits": []}).to_string(),
    )
    .await;
    assert_eq!(got, StatusCode::OK, "{patched}");
    assert_eq!(
        (patched["name"].clone(), patched["traits"].clone()),
        (json!("Billing"), json!([]))
    );
    let hash = shared
        .store
        .get_application(zone_id, id)
        .await
        .unwrap()
        .unwrap()
        .client_secret_hash
        .unwrap();
    assert!(
        caracal_crypto::verify_secret(&chosen, &hash)
            && !caracal_crypto::verify_secret(&secret, &hash)
    );

    // Rotation returns a new secret once; nothing reveals a stored one.
    let (_, _, rotated) = call(&app, "POST", &format!("{one}/rotate-secret"), w, "").await;
    let fresh = rotated["client_secret"].as_str().unwrap();
    let hash = shared
        .store
        .get_application(zone_id, id)
        .await
        .unwrap()
        .unwrap()
        .client_secret_hash
        .unwrap();
    assert!(
        caracal_crypto::verify_secret(fresh, &hash)
            && !caracal_crypto::verify_secret(&chosen, &hash)
    );
    let (got, _, answer) = call(&app, "GET", &format!("{one}/client-secret"), w, "").await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::NOT_FOUND, Some("client_secret_not_stored"))
    );

    // Another zone's path does not reach this application.
    let elsewhere = format!(
        "/v1/zones/{}/applications/{id}",
        other_zone["id"].as_str().unwrap()
    );
    let (got, _, answer) = call(&app, "GET", &elsewhere, w, "").await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (got, _, _) = call(&app, "PATCH", &elsewhere, w, r#"{"name":"stolen"}"#).await;
    assert_eq!(got, StatusCode::NOT_FOUND);

    let (got, _, _) = call(&app, "DELETE", &one, w, "").await;
    assert_eq!(got, StatusCode::NO_CONTENT);
    let (_, _, archived) = call(&app, "GET", &format!("{apps}?status=archived"), w, "").await;
    assert_eq!(archived["items"][0]["id"], created["id"]);
    let (_, _, active) = call(&app, "GET", &apps, w, "").await;
    assert_eq!(active["items"], json!([]));
    let events = audit_outbox(&shared).await;
    assert_eq!(
        types(&events)[2..],
        [
            "admin.application.create",
            "admin.application.update",
            "admin.application.rotate_secret",
            "admin.application.archive"
        ],
        "refused requests left no evidence"
    );
    let evidence = format!("{events:?}");
    assert!(
        !evidence.contains(&chosen) && !evidence.contains(&secret) && !evidence.contains(fresh),
        "no secret in the evidence"
    );
    assert!(evidence.contains("changed_fields"), "{evidence}");
}

#[tokio::test]
async fn admin_tokens_are_minted_once_listed_without_secrets_and_revoked() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let app = router(state);
    let w = Some(writer.as_str());
    let (status, _, minted) = call(
        &app,
        "POST",
        "/v1/admin-tokens",
        w,
        r#"{"name":"ci","scope":"global","capability":"read"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{minted}");
    let plaintext = minted["token"].as_str().unwrap();
    assert!(plaintext.starts_with("cat_"));
    let (got, _, _) = call(&app, "GET", "/v1/zones", Some(plaintext), "").await;
    assert_eq!(got, StatusCode::OK, "the minted token works");
    let (got, _, _) = call(
        &app,
        "POST",
        "/v1/zones",
        Some(plaintext),
        r#"{"name":"x"}"#,
    )
    .await;
    assert_eq!(
        got,
        StatusCode::FORBIDDEN,
        "with the capability it was given"
    );
    let (_, _, listed) = call(&app, "GET", "/v1/admin-tokens", w, "").await;
    assert!(
        !listed.to_string().contains(plaintext),
        "never listed in clear"
    );
    for body in [
        r#"{"name":"x","scope":"zone"}"#,
        r#"{"name":"x","scope":"zone","zone_id":"nope"}"#,
        r#"{"name":"x","scope":"global","zone_id":"z"}"#,
        r#"{"name":"x","scope":"global","capability":"root"}"#,
        r#"{"name":"x","scope":"planet"}"#,
    ] {
        let (got, _, _) = call(&app, "POST", "/v1/admin-tokens", w, body).await;
        assert!(
            got == StatusCode::BAD_REQUEST || got == StatusCode::NOT_FOUND,
            "{body}: {got}"
        );
    }
    let path = format!("/v1/admin-tokens/{}", minted["id"].as_str().unwrap());
    let (got, _, _) = call(&app, "DELETE", &path, w, "").await;
    assert_eq!(got, StatusCode::NO_CONTENT);
    let (got, _, answer) = call(&app, "GET", "/v1/zones", Some(plaintext), "").await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::UNAUTHORIZED, Some("invalid_admin_token"))
    );
    let (got, _, _) = call(&app, "DELETE", &path, w, "").await;
    assert_eq!(got, StatusCode::NOT_FOUND);
    let events = audit_outbox(&shared).await;
    assert_eq!(
        types(&events),
        ["admin.admin_token.mint", "admin.admin_token.revoke"]
    );
    assert!(
        !format!("{events:?}").contains(plaintext),
        "no token in the evidence"
    );
}

#[tokio::test]
async fn provider_secrets_are_sealed_never_listed_and_revealed_only_on_an_audited_write() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let reader = token(&shared, "read", TokenScope::Global).await;
    let app = router(state);
    let w = Some(writer.as_str());
    let (_, _, zone) = call(&app, "POST", "/v1/zones", w, r#"{"name":"p"}"#).await;
    let zone_id = zone["id"].as_str().unwrap();
    let providers = format!("/v1/zones/{zone_id}/providers");
    let api_key = "sk-live-0123456789abcdef";
    let (status, _, created) = call(
        &app,
        "POST",
        &providers,
        w,
        &json!({"name": "CRM key", "identifier": "provider://crm", "kind": "api_key",
                "config_json": {"header": "x-api-key", "api_key": api_key}})
        .to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["config_json"], json!({"header": "x-api-key"}));
    assert_eq!(created["secret_config_keys"], json!(["api_key"]));
    let id = created["id"].as_str().unwrap();
    let one = format!("{providers}/{id}");
    let (_, _, listed) = call(&app, "GET", &providers, Some(&reader), "").await;
    let (_, _, read) = call(&app, "GET", &one, Some(&reader), "").await;
    for shown in [listed.to_string(), read.to_string()] {
        assert!(!shown.contains(api_key), "{shown}");
    }
    // Sealed under the KEK, bound to its purpose.
    let reference = format!("provider/{id}/api_key");
    let sealed = shared
        .store
        .get_sealed_secret(zone_id, &reference)
        .await
        .unwrap()
        .unwrap();
    assert!(!sealed.envelope.contains(api_key));
    assert_eq!(
        shared
            .kek
            .open("provider-secret", &sealed.envelope)
            .unwrap(),
        api_key.as_bytes()
    );

    let reveal = format!("{one}/reveal-secrets");
    let (got, _, answer) = call(&app, "POST", &reveal, Some(&reader), "").await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::FORBIDDEN, Some("admin_token_read_only"))
    );
    let (got, _, revealed) = call(&app, "POST", &reveal, w, "").await;
    assert_eq!(got, StatusCode::OK);
    assert_eq!(revealed["secrets"], json!({"api_key": api_key}));
    let recorded = shared
        .bus
        .streams
        .range(caracal_bus::stream_names::AUDIT_EVENTS, None, 10)
        .await
        .unwrap();
    assert!(
        recorded
            .iter()
            .any(|entry| entry.fields["data"].contains("admin.provider.reveal_secrets")),
        "the reveal is on the audit stream before the secret leaves"
    );

    // A PATCH without secrets keeps them; with one it rotates (a new sealed version).
    let (got, _, patched) = call(
        &app,
        "PATCH",
        &one,
        w,
        r#"{"config_json":{"header":"authorization"}}"#,
    )
    .await;
    assert_eq!(got, StatusCode::OK, "{patched}");
    assert_eq!(patched["secret_config_keys"], json!(["api_key"]));
    let (got, _, _) = call(
        &app,
        "PATCH",
        &one,
        w,
        r#"{"config_json":{"api_key":"rotated-key-value"}}"#,
    )
    .await;
    assert_eq!(got, StatusCode::OK);
    let sealed = shared
        .store
        .get_sealed_secret(zone_id, &reference)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sealed.version, 2);

    for (body, status, expected) in [
        (
            r#"{"name":"x","kind":"api_key"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            r#"{"name":"x","kind":"ldap"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            r#"{"name":"x","kind":"http_basic","config_json":{"password":"p"}}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            r#"{"name":"x","kind":"oauth2_client_credentials","config_json":{"token_url":"ftp://x","client_id":"c","client_secret":"s"}}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            r#"{"identifier":"crm","kind":"none"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            r#"{"identifier":"provider://crm","kind":"none"}"#,
            StatusCode::CONFLICT,
            "provider_identifier_conflict",
        ),
        (
            r#"{"name":"x","kind":"none","config_json":{"api_key":7}}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
    ] {
        let (got, _, answer) = call(&app, "POST", &providers, w, body).await;
        assert_eq!(
            (got, code(&answer)),
            (status, Some(expected)),
            "{body}: {answer}"
        );
    }
}

#[tokio::test]
async fn resources_bind_a_provider_of_their_zone_and_check_scopes_and_operations() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let app = router(state);
    let w = Some(writer.as_str());
    let (_, _, zone) = call(&app, "POST", "/v1/zones", w, r#"{"name":"r"}"#).await;
    let (_, _, other) = call(&app, "POST", "/v1/zones", w, r#"{"name":"other"}"#).await;
    let zone_id = zone["id"].as_str().unwrap();
    let other_id = other["id"].as_str().unwrap();
    let (_, _, provider) = call(
        &app,
        "POST",
        &format!("/v1/zones/{zone_id}/providers"),
        w,
        r#"{"name":"none","kind":"none"}"#,
    )
    .await;
    let (_, _, foreign) = call(
        &app,
        "POST",
        &format!("/v1/zones/{other_id}/providers"),
        w,
        r#"{"name":"theirs","kind":"none"}"#,
    )
    .await;
    let provider_id = provider["id"].as_str().unwrap();
    let resources = format!("/v1/zones/{zone_id}/resources");
    let good = json!({
        "name": "CRM", "identifier": "resource://crm", "scopes": ["crm:read", "crm:write"],
        "upstream_url": "http://127.0.0.1:9/api", "credential_provider_id": provider_id,
        "operations": [{"method": "GET", "path": "/contacts", "scope": "crm:read"}],
    });
    let (status, _, created) = call(&app, "POST", &resources, w, &good.to_string()).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["operation_enforcement"], "enforced");
    assert_eq!(created["operations"][0]["scope"], "crm:read");

    let with = |patch: Value| {
        let mut body = good.clone();
        for (key, value) in patch.as_object().unwrap() {
            if value.is_null() {
                body.as_object_mut().unwrap().remove(key);
            } else {
                body[key] = value.clone();
            }
        }
        body.to_string()
    };
    for (body, status, expected) in [
        (
            with(json!({"identifier": "resource://other", "credential_provider_id": null})),
            StatusCode::BAD_REQUEST,
            "credential_provider_required",
        ),
        (
            with(json!({"identifier": "resource://other", "upstream_url": null})),
            StatusCode::BAD_REQUEST,
            "upstream_url_required",
        ),
        (
            with(json!({"identifier": "resource://other", "scopes": []})),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            with(json!({"identifier": "resource://other", "scopes": ["CRM READ"]})),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            with(json!({"identifier": "resource://other", "scopes": ["agent:lifecycle"]})),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            with(
                json!({"identifier": "resource://other", "operations": [{"method": "GET", "path": "/x", "scope": "nope"}]}),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            with(
                json!({"identifier": "resource://other", "operations": [{"method": "BREW", "path": "/x", "scope": "crm:read"}]}),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            with(json!({"identifier": "resource://other", "upstream_url": "file:///etc/passwd"})),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            with(json!({"identifier": "resource://other", "operation_enforcement": "sometimes"})),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            with(
                json!({"identifier": "resource://other", "credential_provider_id": foreign["id"]}),
            ),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            with(json!({})),
            StatusCode::CONFLICT,
            "resource_identifier_conflict",
        ),
    ] {
        let (got, _, answer) = call(&app, "POST", &resources, w, &body).await;
        assert_eq!(
            (got, code(&answer)),
            (status, Some(expected)),
            "{body}: {answer}"
        );
    }

    // Narrowing the scopes re-checks the operations already stored.
    let one = format!("{resources}/{}", created["id"].as_str().unwrap());
    let (got, _, answer) = call(&app, "PATCH", &one, w, r#"{"scopes":["crm:write"]}"#).await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::BAD_REQUEST, Some("invalid_body"))
    );
    let (got, _, patched) = call(
        &app,
        "PATCH",
        &one,
        w,
        r#"{"scopes":["crm:read"],"operation_enforcement":"transport_uniform"}"#,
    )
    .await;
    assert_eq!(got, StatusCode::OK, "{patched}");
    assert_eq!(patched["scopes"], json!(["crm:read"]));

    // A provider in use cannot be archived; once the resource goes, it can.
    let provider_path = format!("/v1/zones/{zone_id}/providers/{provider_id}");
    let (got, _, answer) = call(&app, "DELETE", &provider_path, w, "").await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::CONFLICT, Some("provider_in_use"))
    );
    let (got, _, _) = call(&app, "DELETE", &one, w, "").await;
    assert_eq!(got, StatusCode::NO_CONTENT);
    let (got, _, _) = call(&app, "DELETE", &provider_path, w, "").await;
    assert_eq!(got, StatusCode::NO_CONTENT);
    assert_eq!(
        shared.store.list_resources(zone_id).await.unwrap().len(),
        1,
        "archived, not deleted"
    );
}

fn document(app_id: &str, scopes: &[&str]) -> String {
    format!(
        "# caracal:data-document\npackage caracal.authz\nimport rego.v1\napp_ids := {{\"billing\": \"{app_id}\"}}\ngrants := {{\"resource://ledger\": {{\"application\": \"billing\", \"roles\": {{\"{app_id}\": {}}}}}}}\n",
        serde_json::to_string(scopes).unwrap()
    )
}

#[tokio::test]
async fn policies_activate_through_the_outbox_with_canaries_and_roll_back_to_last_known_good() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let reader = token(&shared, "read", TokenScope::Global).await;
    let app = router(state);
    let w = Some(writer.as_str());
    let (_, _, zone) = call(&app, "POST", "/v1/zones", w, r#"{"name":"pol"}"#).await;
    let zone_id = zone["id"].as_str().unwrap();
    let base = format!("/v1/zones/{zone_id}");

    // Validation: named diagnostics, 422, nothing stored.
    let (got, _, answer) = call(
        &app,
        "POST",
        "/v1/policies/validate",
        Some(&reader),
        &json!({"content": "package x"}).to_string(),
    )
    .await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_rego"))
    );
    assert_eq!(
        answer["details"]["diagnostics"][0]["code"],
        "missing_data_document_header"
    );
    let (got, _, valid) = call(
        &app,
        "POST",
        "/v1/policies/validate",
        Some(&reader),
        &json!({"content": document("app-1", &["ledger:read"])}).to_string(),
    )
    .await;
    assert_eq!(
        (got, valid["preview"]["rules"].clone()),
        (StatusCode::OK, json!(["app_ids", "grants"]))
    );
    let (_, _, templates) = call(&app, "GET", "/v1/policy-templates", Some(&reader), "").await;
    for template in templates.as_array().unwrap() {
        let (got, _, _) = call(
            &app,
            "POST",
            "/v1/policies/validate",
            Some(&reader),
            &json!({"content": template["content"]}).to_string(),
        )
        .await;
        assert_eq!(got, StatusCode::OK, "template {}", template["id"]);
    }
    let (got, _, _) = call(
        &app,
        "POST",
        &format!("{base}/policies"),
        w,
        &json!({"name": "bad", "content": "allow := true"}).to_string(),
    )
    .await;
    assert_eq!(got, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, _, listed) = call(&app, "GET", &format!("{base}/policies"), w, "").await;
    assert_eq!(listed["items"], json!([]), "a refused policy is not stored");

    // A policy with two versions, a set with a version per policy version.
    let (status, _, policy) = call(
        &app,
        "POST",
        &format!("{base}/policies"),
        w,
        &json!({"name": "grants", "content": document("app-1", &["ledger:read", "ledger:refund"])})
            .to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{policy}");
    let v1 = policy["version_id"].as_str().unwrap().to_owned();
    let (_, _, second) = call(
        &app,
        "POST",
        &format!(
            "{base}/policies/{}/versions",
            policy["id"].as_str().unwrap()
        ),
        w,
        &json!({"content": document("app-1", &["ledger:read"])}).to_string(),
    )
    .await;
    assert_eq!(second["version"], 2);
    let v2 = second["version_id"].as_str().unwrap().to_owned();
    let (_, _, set) = call(
        &app,
        "POST",
        &format!("{base}/policy-sets"),
        w,
        r#"{"name":"main"}"#,
    )
    .await;
    let sets = format!("{base}/policy-sets/{}", set["id"].as_str().unwrap());
    let mint = |scopes: &[&str]| {
        json!({
            "flow": "mint", "application_id": "app-1", "resource": "resource://ledger",
            "scopes": scopes, "labels": ["app-1"], "edge_scopes": ["ledger:read", "ledger:refund"], "session": true,
        })
    };
    let canaries = json!([
        {"name": "read allowed", "request": mint(&["ledger:read"]), "expect": "allow"},
        {"name": "refund allowed", "request": mint(&["ledger:refund"]), "expect": "allow"},
    ]);
    let (_, _, generous) = call(
        &app,
        "POST",
        &format!("{sets}/versions"),
        w,
        &json!({"manifest": [{"policy_version_id": v1}], "canaries": canaries}).to_string(),
    )
    .await;
    let (_, _, strict) = call(
        &app,
        "POST",
        &format!("{sets}/versions"),
        w,
        &json!({"manifest": [{"policy_version_id": v2}], "canaries": canaries}).to_string(),
    )
    .await;
    let (_, _, strict_honest) = call(
        &app,
        "POST",
        &format!("{sets}/versions"),
        w,
        &json!({"manifest": [{"policy_version_id": v2}]}).to_string(),
    )
    .await;
    for bad in [
        json!({"manifest": []}),
        json!({"manifest": [{"policy_version_id": v1}, {"policy_version_id": v1}]}),
        json!({"manifest": [{"policy_version_id": v1}], "canaries": [{"name": "x", "request": {"flow": "fly"}, "expect": "allow"}]}),
    ] {
        let (got, _, _) = call(
            &app,
            "POST",
            &format!("{sets}/versions"),
            w,
            &bad.to_string(),
        )
        .await;
        assert_eq!(got, StatusCode::BAD_REQUEST, "{bad}");
    }
    let (got, _, _) = call(
        &app,
        "POST",
        &format!("{sets}/versions"),
        w,
        &json!({"manifest": [{"policy_version_id": "elsewhere"}]}).to_string(),
    )
    .await;
    assert_eq!(got, StatusCode::NOT_FOUND);

    // Simulate any version without activating it (a read token may).
    let (_, _, simulated) = call(
        &app,
        "POST",
        &format!("{sets}/simulate"),
        Some(&reader),
        &json!({"version_id": strict["id"], "input": mint(&["ledger:refund"])}).to_string(),
    )
    .await;
    assert_eq!(simulated["result"]["decision"], "deny");
    assert_eq!(
        simulated["result"]["diagnostics"][0]["code"],
        "role_scope_mismatch"
    );

    // Activation: 202, the invalidation rides the outbox, the status follows it.
    let (status, _, activated) = call(
        &app,
        "POST",
        &format!("{sets}/activate"),
        w,
        &json!({"version_id": generous["id"]}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{activated}");
    let status_url = activated["status_url"].as_str().unwrap().to_owned();
    let (_, _, pending) = call(&app, "GET", &status_url, Some(&reader), "").await;
    assert_eq!(pending["propagation_status"], "waiting_for_outbox");
    let rows = shared
        .store
        .claim_outbox("test", 100, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let invalidation = rows
        .iter()
        .find(|row| row.stream == "caracal.policy.invalidate")
        .unwrap();
    assert_eq!(
        invalidation.fields["policy_set_version_id"],
        generous["id"].as_str().unwrap()
    );
    let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
    shared.store.outbox_published("test", &ids).await.unwrap();
    let (_, _, published) = call(&app, "GET", &status_url, Some(&reader), "").await;
    assert_eq!(published["propagation_status"], "waiting_for_sts");
    crate::policy::PolicyCache::default()
        .refresh_all(shared.store.as_ref(), "sts-test")
        .await
        .unwrap();
    let (_, _, loaded) = call(&app, "GET", &status_url, Some(&reader), "").await;
    assert_eq!(loaded["propagation_status"], "loaded", "{loaded}");
    assert_eq!(loaded["sts_status"]["loaded_replicas"], 1);

    // A version whose canaries disagree is refused; the active version stays.
    let (got, _, refused) = call(
        &app,
        "POST",
        &format!("{sets}/activate"),
        w,
        &json!({"version_id": strict["id"]}).to_string(),
    )
    .await;
    assert_eq!(
        (got, code(&refused)),
        (StatusCode::CONFLICT, Some("canary_failed"))
    );
    assert_eq!(refused["details"]["failures"][0]["name"], "refund allowed");
    let (_, _, current) = call(&app, "GET", &sets, w, "").await;
    assert_eq!(current["active_version_id"], generous["id"]);

    // Activate the strict version, then roll back to the last known good in one call.
    let (got, _, _) = call(
        &app,
        "POST",
        &format!("{sets}/activate"),
        w,
        &json!({"version_id": strict_honest["id"]}).to_string(),
    )
    .await;
    assert_eq!(got, StatusCode::ACCEPTED);
    let (_, _, after) = call(&app, "GET", &sets, w, "").await;
    assert_eq!(
        (
            after["active_version_id"].clone(),
            after["last_known_good_version_id"].clone()
        ),
        (strict_honest["id"].clone(), generous["id"].clone())
    );
    let (got, _, rolled) = call(&app, "POST", &format!("{sets}/rollback"), w, "").await;
    assert_eq!(got, StatusCode::ACCEPTED, "{rolled}");
    let (_, _, restored) = call(&app, "GET", &sets, w, "").await;
    assert_eq!(restored["active_version_id"], generous["id"]);
    // The version rolled back from is not known good: nothing to return to until a new
    // activation succeeds.
    assert_eq!(
        rolled["last_known_good_version_id"],
        Value::Null,
        "{rolled}"
    );
    let (got, _, again) = call(&app, "POST", &format!("{sets}/rollback"), w, "").await;
    assert_eq!(
        (got, again["error"].as_str()),
        (StatusCode::CONFLICT, Some("no_last_known_good")),
        "{again}"
    );

    // A read token changes nothing.
    let (got, _, _) = call(&app, "POST", &format!("{sets}/rollback"), Some(&reader), "").await;
    assert_eq!(got, StatusCode::FORBIDDEN);
    let events = audit_outbox(&shared).await;
    assert!(
        types(&events).contains(&"admin.policy_set.rollback"),
        "{events:?}"
    );

    // Archiving the active set leaves the zone with no bundle: every request denies.
    let cache = crate::policy::PolicyCache::default();
    cache
        .refresh_all(shared.store.as_ref(), "sts-test")
        .await
        .unwrap();
    assert!(cache.get(zone_id).is_some());
    let (got, _, _) = call(&app, "DELETE", &sets, w, "").await;
    assert_eq!(got, StatusCode::NO_CONTENT);
    assert!(
        shared
            .store
            .policy_binding(zone_id)
            .await
            .unwrap()
            .is_none()
    );
    cache
        .refresh_all(shared.store.as_ref(), "sts-test")
        .await
        .unwrap();
    assert!(cache.get(zone_id).is_none(), "deny all");
    let (got, _, _) = call(&app, "GET", &sets, w, "").await;
    assert_eq!(got, StatusCode::NOT_FOUND);
    let policy_path = format!("{base}/policies/{}", policy["id"].as_str().unwrap());
    let (got, _, _) = call(&app, "DELETE", &policy_path, w, "").await;
    assert_eq!(got, StatusCode::NO_CONTENT);
    let (_, _, listed) = call(&app, "GET", &format!("{base}/policies"), w, "").await;
    assert_eq!(listed["items"], json!([]));
}

#[tokio::test]
async fn approvals_are_listed_by_state_and_decided_once_by_an_approve_token() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let approver = token(&shared, "approve", TokenScope::Global).await;
    let app = router(state);
    let (_, _, zone) = call(&app, "POST", "/v1/zones", Some(&writer), r#"{"name":"a"}"#).await;
    let zone_id = zone["id"].as_str().unwrap();
    let now = caracal_store::now_ms();
    for (id, class, expires_at_ms) in [
        ("hold-1", "operator", now + 600_000),
        ("hold-2", "subject", now + 600_000),
        ("hold-3", "any", now - 1),
    ] {
        shared
            .store
            .create_approval_hold(
                &caracal_store::ApprovalHold {
                    id: id.into(),
                    zone_id: zone_id.into(),
                    session_id: "ar-1".into(),
                    principal_id: if id == "hold-1" { "user-9" } else { "user-1" }.into(),
                    application_id: "app-1".into(),
                    tier: "high".into(),
                    approver_class: class.into(),
                    binding_hash: "ab".repeat(32),
                    metadata: "{}".into(),
                    created_at_ms: if id == "hold-3" { now - 60_000 } else { now },
                    expires_at_ms,
                    decision: None,
                    decided_at_ms: None,
                    decision_reason: None,
                    approver_id: None,
                    consumed_at_ms: None,
                    consumed_record_id: None,
                },
                &[],
            )
            .await
            .unwrap();
    }
    let base = format!("/v1/zones/{zone_id}/approvals");
    let (_, _, counts) = call(&app, "GET", &format!("{base}/counts"), Some(&writer), "").await;
    assert_eq!(
        counts,
        json!({"pending": 2, "approved": 0, "rejected": 0, "expired": 1, "consumed": 0})
    );
    let (_, _, pending) = call(
        &app,
        "GET",
        &format!("{base}?state=pending"),
        Some(&approver),
        "",
    )
    .await;
    assert_eq!(pending["items"].as_array().unwrap().len(), 2);
    let (got, _, _) = call(
        &app,
        "GET",
        &format!("{base}?state=odd"),
        Some(&approver),
        "",
    )
    .await;
    assert_eq!(got, StatusCode::BAD_REQUEST);
    // By principal and by when they were raised.
    let ids = async |query: String| {
        let (status, _, page) =
            call(&app, "GET", &format!("{base}?{query}"), Some(&approver), "").await;
        assert_eq!(status, StatusCode::OK, "{query}: {page}");
        let mut ids: Vec<String> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|hold| hold["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids("principal=user-9".into()).await, ["hold-1"]);
    assert_eq!(ids(format!("until={}", now - 1)).await, ["hold-3"]);
    assert_eq!(
        ids(format!("since={}&principal=user-1", now - 1)).await,
        ["hold-2"]
    );
    let (got, _, _) = call(
        &app,
        "GET",
        &format!("{base}?since=soon"),
        Some(&approver),
        "",
    )
    .await;
    assert_eq!(got, StatusCode::BAD_REQUEST);

    let approve = |id: &str| format!("{base}/{id}/approve");
    let (got, _, answer) = call(&app, "POST", &approve("hold-1"), Some(&writer), "{}").await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::FORBIDDEN, Some("approve_capability_required"))
    );
    let (got, _, answer) = call(&app, "POST", &approve("hold-2"), Some(&approver), "{}").await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::FORBIDDEN, Some("subject_approval_required"))
    );
    let (got, _, answer) = call(&app, "POST", &approve("hold-3"), Some(&approver), "{}").await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::CONFLICT, Some("approval_not_decidable"))
    );
    assert_eq!(answer["details"]["state"], "expired");
    let (got, _, answer) = call(
        &app,
        "POST",
        &approve("hold-1"),
        Some(&approver),
        &json!({"reason": "x".repeat(501)}).to_string(),
    )
    .await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::BAD_REQUEST, Some("invalid_body"))
    );
    let (got, _, decided) = call(
        &app,
        "POST",
        &approve("hold-1"),
        Some(&approver),
        r#"{"reason":"on call"}"#,
    )
    .await;
    assert_eq!(got, StatusCode::OK, "{decided}");
    assert_eq!(
        (decided["state"].clone(), decided["decision_reason"].clone()),
        (json!("approved"), json!("on call"))
    );
    assert!(
        decided["approver_id"]
            .as_str()
            .unwrap()
            .starts_with("admin:")
    );
    let (got, _, answer) = call(
        &app,
        "POST",
        &format!("{base}/hold-1/reject"),
        Some(&approver),
        "",
    )
    .await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::CONFLICT, Some("approval_not_decidable")),
        "decided once"
    );
    let (got, _, _) = call(&app, "GET", &format!("{base}/nope"), Some(&approver), "").await;
    assert_eq!(got, StatusCode::NOT_FOUND);
    let events = audit_outbox(&shared).await;
    assert_eq!(types(&events)[1..], ["step_up_decided"]);
    let decided: Value = serde_json::from_str(&events[1].1).unwrap();
    assert_eq!(decided["decision"], "allow");
    let metadata = &decided["metadata_json"];
    assert_eq!(metadata["challenge_id"], "hold-1");
    assert_eq!(metadata["decision"], "approved");
    assert_eq!(metadata["approver_plane"], "admin");
    assert!(
        metadata["approver_id"]
            .as_str()
            .unwrap()
            .starts_with("admin:"),
        "{metadata}"
    );
}

/// Every `(method, path)` the `/v1` modules declare with `.route(…)`, read from their source.
fn declared_routes() -> Vec<(String, String)> {
    let sources = [
        include_str!("zones.rs"),
        include_str!("applications.rs"),
        include_str!("approvals.rs"),
        include_str!("providers.rs"),
        include_str!("resources.rs"),
        include_str!("policies.rs"),
        include_str!("tokens.rs"),
        include_str!("keys.rs"),
        include_str!("subjects.rs"),
        include_str!("reachability.rs"),
        include_str!("views.rs"),
        include_str!("objects.rs"),
        include_str!("notifications.rs"),
        include_str!("deployment.rs"),
        include_str!("connections.rs"),
        include_str!("incident.rs"),
        include_str!("recovery.rs"),
        include_str!("openapi.rs"),
        include_str!("../api.rs"),
        include_str!("../control.rs"),
    ];
    let mut routes = Vec::new();
    for source in sources {
        let mut rest = source;
        while let Some(at) = rest.find(".route(") {
            rest = &rest[at + ".route(".len()..];
            let Some(open) = rest.find('"') else { break };
            let Some(close) = rest[open + 1..].find('"') else {
                break;
            };
            let path = &rest[open + 1..open + 1 + close];
            // The handler chain runs to the call's closing parenthesis.
            let mut depth = 1;
            let mut end = 0;
            for (index, character) in rest.char_indices() {
                match character {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = index;
                    break;
                }
            }
            let chain = &rest[open + 1 + close..end];
            for method in ["get", "post", "patch", "put", "delete"] {
                let called = chain.match_indices(&format!("{method}(")).any(|(i, _)| {
                    i == 0
                        || !chain.as_bytes()[i - 1].is_ascii_alphanumeric()
                            && chain.as_bytes()[i - 1] != b'_'
                });
                if called {
                    routes.push((method.to_owned(), path.to_owned()));
                }
            }
        }
    }
    routes
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_only_served_ones() {
    let declared = declared_routes();
    assert!(
        declared.len() > 40,
        "the scan found {} routes",
        declared.len()
    );
    let (_keep, state) = role_state(Role::Api);
    let app = router(state);
    let (status, _, document) = call(&app, "GET", "/v1/openapi.json", None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(document["openapi"], "3.1.0");
    let mut documented = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((method.clone(), path.clone()));
        }
    }
    for route in &declared {
        assert!(
            documented.contains(route),
            "{route:?} is served but not documented"
        );
    }
    for (method, path) in &documented {
        assert!(
            declared.contains(&(method.clone(), path.clone())),
            "{method} {path} is documented but not declared"
        );
        // And the router answers it (without a token: 401, never 404 or 405).
        let concrete = path
            .replace("{zone_id}", "z")
            .replace("{version_id}", "v")
            .replace("{id}", "x");
        let (status, _, _) = call(&app, &method.to_uppercase(), &concrete, None, "").await;
        assert!(
            status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {status}"
        );
    }
}

/// A small deterministic generator (xorshift), so a failing case can be replayed.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }

    /// A body: random bytes, a mutated valid body, or JSON of a random shape.
    fn body(&mut self, seeds: &[&str]) -> Vec<u8> {
        match self.next() % 3 {
            0 => (0..self.next() % 64).map(|_| self.next() as u8).collect(),
            1 => {
                let mut bytes = self.pick(seeds).as_bytes().to_vec();
                for _ in 0..=self.next() % 4 {
                    if bytes.is_empty() {
                        break;
                    }
                    let at = (self.next() % bytes.len() as u64) as usize;
                    bytes[at] = self.next() as u8;
                }
                bytes
            }
            _ => {
                let values = [
                    "null",
                    "0",
                    "-1",
                    "1e309",
                    "\"\"",
                    "[]",
                    "{}",
                    "true",
                    "\"x\"",
                    "[[[[[]]]]]",
                ];
                let keys = [
                    "name",
                    "kind",
                    "scopes",
                    "content",
                    "manifest",
                    "version_id",
                    "input",
                    "config_json",
                    "traits",
                    "client_secret",
                    "identifier",
                    "reason",
                    "url",
                    "event_types",
                    "active",
                    "expires_in",
                    "provider_id",
                    "subject_id",
                    "access_token",
                    "expires_at",
                    "dcr_enabled",
                    "dcr_shutdown",
                ];
                let fields: Vec<String> = (0..self.next() % 4)
                    .map(|_| format!("\"{}\": {}", self.pick(&keys), self.pick(&values)))
                    .collect();
                format!("{{{}}}", fields.join(",")).into_bytes()
            }
        }
    }
}

#[tokio::test]
async fn no_body_or_query_sent_to_any_route_gets_a_server_error() {
    let (_keep, mut state) = role_state(Role::Api);
    // Control invocations on, so their route answers rather than 503 `control_disabled`.
    state.control = Some(crate::control::Control::new(true, "http://sts".to_owned()));
    let shared = state.shared.clone();
    let writer = token(&shared, "write,approve", TokenScope::Global).await;
    let app = router(state);
    let (_, _, zone) = call(
        &app,
        "POST",
        "/v1/zones",
        Some(&writer),
        r#"{"name":"fuzz","dcr_enabled":true}"#,
    )
    .await;
    let zone_id = zone["id"].as_str().unwrap();
    let seeds = [
        r#"{"name":"n","url":"https://hooks.example/a","event_types":["step_up_issued"]}"#,
        r#"{"name":"n","expires_in":60}"#,
        r#"{"provider_id":"p","subject_id":"s","access_token":"t","expires_at":"2030-01-01T00:00:00Z"}"#,
        r#"{"dcr_enabled":false,"dcr_shutdown":"revoke_live"}"#,
        r#"{"name":"n","registration_method":"managed","traits":["a"]}"#,
        r#"{"name":"n","kind":"api_key","config_json":{"api_key":"k"}}"#,
        r#"{"name":"n","scopes":["a:b"],"upstream_url":"http://h","credential_provider_id":"p"}"#,
        r##"{"name":"n","content":"# caracal:data-document\npackage caracal.authz\napp_ids := {\"a\": \"b\"}"}"##,
        r#"{"manifest":[{"policy_version_id":"v"}],"canaries":[]}"#,
        r#"{"version_id":"v","input":{"flow":"mint","application_id":"a","resource":"r"}}"#,
        r#"{"name":"t","scope":"global","capability":"read"}"#,
    ];
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    for operation in super::openapi::OPERATIONS {
        if !matches!(operation.method, "post" | "patch") {
            continue;
        }
        // A token per route keeps every round inside the per-token request budget.
        let writer = token(&shared, "write,approve", TokenScope::Global).await;
        let path = operation
            .path
            .replace("{zone_id}", zone_id)
            .replace("{version_id}", "v")
            .replace("{id}", "x");
        for round in 0..60 {
            let body = noise.body(&seeds);
            let response = app
                .clone()
                .oneshot(
                    http::Request::builder()
                        .method(operation.method.to_uppercase().as_str())
                        .uri(&path)
                        .header("authorization", format!("Bearer {writer}"))
                        .body(axum::body::Body::from(body.clone()))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert!(
                response.status().as_u16() < 500,
                "{} {path} round {round}: {} for {:?}",
                operation.method,
                response.status(),
                String::from_utf8_lossy(&body)
            );
        }
    }
    // Query strings of every GET (the public OAuth callback among them): random pairs of
    // the characters a URI may carry, escapes half-formed and keys repeated.
    let alphabet = b"abcdefgz019=&%+-._~!$'()*,;:@/?";
    let keys = [
        "limit", "cursor", "state", "code", "error", "zone_id", "from", "to", "q",
    ];
    for operation in super::openapi::OPERATIONS {
        if operation.method != "get" {
            continue;
        }
        let reader = token(&shared, "read", TokenScope::Global).await;
        let path = operation
            .path
            .replace("{zone_id}", zone_id)
            .replace("{version_id}", "v")
            .replace("{id}", "x");
        for round in 0..20 {
            let mut query = String::new();
            for _ in 0..=noise.next() % 3 {
                let value: String = (0..noise.next() % 12)
                    .map(|_| char::from(alphabet[(noise.next() % alphabet.len() as u64) as usize]))
                    .collect();
                query.push_str(&format!("{}={value}&", noise.pick(&keys)));
            }
            let uri = format!("{path}?{query}");
            let response = app
                .clone()
                .oneshot(
                    http::Request::get(&uri)
                        .header("authorization", format!("Bearer {reader}"))
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert!(
                response.status().as_u16() < 500,
                "GET {uri} round {round}: {}",
                response.status()
            );
        }
    }
}

#[tokio::test]
async fn an_address_with_too_many_failed_authentications_is_locked_out() {
    use axum::extract::connect_info::MockConnectInfo;
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let app = router(state.clone()).layer(MockConnectInfo(std::net::SocketAddr::from((
        [192, 0, 2, 7],
        5000,
    ))));
    let bad = format!("cat_{}", "A".repeat(43));
    crate::test_support::budget_minute_ahead(20).await;
    for attempt in 1..=crate::auth::AUTH_FAILURES_PER_WINDOW {
        let (got, _, answer) = call(&app, "GET", "/v1/zones", Some(&bad), "").await;
        assert_eq!(
            (got, code(&answer)),
            (StatusCode::UNAUTHORIZED, Some("invalid_admin_token")),
            "{attempt}"
        );
    }
    // Locked out now, even with a good token; another address is not.
    let (got, headers, answer) = call(&app, "GET", "/v1/zones", Some(&writer), "").await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    assert!(headers.contains_key("retry-after"));
    let elsewhere = router(state).layer(MockConnectInfo(std::net::SocketAddr::from((
        [192, 0, 2, 8],
        5000,
    ))));
    let (got, _, _) = call(&elsewhere, "GET", "/v1/zones", Some(&writer), "").await;
    assert_eq!(got, StatusCode::OK);
}

#[tokio::test]
async fn explain_rebuilds_a_recorded_deny_with_the_version_it_was_decided_under() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let app = router(state);
    let w = Some(writer.as_str());
    let (_, _, zone) = call(&app, "POST", "/v1/zones", w, r#"{"name":"ex"}"#).await;
    let zone_id = zone["id"].as_str().unwrap();
    let base = format!("/v1/zones/{zone_id}");
    let (_, _, policy) = call(
        &app,
        "POST",
        &format!("{base}/policies"),
        w,
        &json!({"name": "g", "content": document("app-1", &["ledger:read"])}).to_string(),
    )
    .await;
    let (_, _, set) = call(
        &app,
        "POST",
        &format!("{base}/policy-sets"),
        w,
        r#"{"name":"s"}"#,
    )
    .await;
    let (_, _, version) = call(
        &app,
        "POST",
        &format!(
            "{base}/policy-sets/{}/versions",
            set["id"].as_str().unwrap()
        ),
        w,
        &json!({"manifest": [{"policy_version_id": policy["version_id"]}]}).to_string(),
    )
    .await;
    let input = json!({
        "flow": "mint", "application_id": "app-1", "resource": "resource://ledger",
        "scopes": ["ledger:refund"], "labels": ["app-1"], "edge_scopes": ["ledger:refund"], "session": true,
    });
    let event =
        |id: &str, seq: i64, metadata: Value, version: Option<&str>| caracal_store::AuditEvent {
            id: id.into(),
            zone_id: zone_id.into(),
            event_type: "sts.exchange".into(),
            request_id: "req-explain".into(),
            decision: "deny".into(),
            policy_set_id: None,
            policy_set_version_id: version.map(str::to_owned),
            manifest_sha: None,
            evaluation_status: "complete".into(),
            determining_policies: "[]".into(),
            diagnostics: r#"[{"code":"role_scope_mismatch"}]"#.into(),
            metadata: metadata.to_string(),
            occurred_at_ms: seq,
            ingested_at_ms: seq,
            chain_seq: seq,
            content_sha256: "11".repeat(32),
            prev_content_sha256: "11".repeat(32),
            chain_mac: "22".repeat(32),
            chain_key_id: "chain-1".into(),
        };
    shared
        .store
        .insert_audit_events(&[
            event(
                "ev-1",
                1,
                json!({"policy_input": input}),
                version["id"].as_str(),
            ),
            event("ev-2", 2, json!({}), None),
        ])
        .await
        .unwrap();
    let (got, _, explained) = call(
        &app,
        "GET",
        &format!("{base}/audit/explain?request_id=req-explain"),
        w,
        "",
    )
    .await;
    assert_eq!(got, StatusCode::OK, "{explained}");
    assert_eq!(explained["final_decision"], "deny");
    let denied = explained["denied"].as_array().unwrap();
    assert_eq!(denied[0]["rebuilt"]["decision"], "deny");
    assert_eq!(
        denied[0]["rebuilt"]["diagnostics"][0]["code"],
        "role_scope_mismatch"
    );
    assert_eq!(denied[0]["matches_record"], true);
    assert_eq!(denied[0]["policy_input"], input);
    assert!(
        denied[1]["unavailable"]
            .as_str()
            .unwrap()
            .contains("no policy input")
    );
}

#[tokio::test]
async fn requests_beyond_the_budget_of_an_address_or_a_token_are_refused() {
    use axum::extract::connect_info::MockConnectInfo;
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let spender = token(&shared, "read", TokenScope::Global).await;
    let other = token(&shared, "read", TokenScope::Global).await;
    let app = router(state.clone()).layer(MockConnectInfo(std::net::SocketAddr::from((
        [192, 0, 2, 9],
        5000,
    ))));
    crate::test_support::budget_minute_ahead(20).await;
    for _ in 0..crate::auth::REQUESTS_PER_WINDOW {
        let (got, _, _) = call(&app, "GET", "/v1/zones", Some(&spender), "").await;
        assert_eq!(got, StatusCode::OK);
    }
    // The address is spent, whatever the token; the token is spent, wherever it comes from.
    let (got, headers, answer) = call(&app, "GET", "/v1/zones", Some(&other), "").await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    assert!(headers.contains_key("retry-after"));
    let elsewhere = router(state).layer(MockConnectInfo(std::net::SocketAddr::from((
        [192, 0, 2, 10],
        5000,
    ))));
    let (got, _, _) = call(&elsewhere, "GET", "/v1/zones", Some(&spender), "").await;
    assert_eq!(got, StatusCode::TOO_MANY_REQUESTS);
    let (got, _, _) = call(&elsewhere, "GET", "/v1/zones", Some(&other), "").await;
    assert_eq!(got, StatusCode::OK);
}

#[tokio::test]
async fn without_a_rate_counter_the_admin_api_refuses() {
    let directory = tempfile::tempdir().unwrap();
    let store = caracal_store::SqliteStore::open(&directory.path().join("store.db")).unwrap();
    let embedded = std::sync::Arc::new(caracal_bus::EmbeddedBus::new(store.clone()));
    let bus = crate::state::Bus {
        streams: embedded.clone(),
        replay: embedded,
        rates: std::sync::Arc::new(crate::test_support::DownBus),
    };
    let (_keep, shared) = crate::test_support::shared_with_bus(directory, store, bus);
    let writer = token(&shared, "write", TokenScope::Global).await;
    let app = router(crate::state::RoleState::new(Role::Api, shared));
    let (got, _, answer) = call(&app, "GET", "/v1/zones", Some(&writer), "").await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready"))
    );
}

#[tokio::test]
async fn issuers_grants_and_workloads_keep_their_rules_and_their_secrets() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let reader = token(&shared, "read", TokenScope::Global).await;
    let app = router(state);
    let (w, r) = (Some(writer.as_str()), Some(reader.as_str()));
    let (_, _, zone) = call(&app, "POST", "/v1/zones", w, r#"{"name":"objects"}"#).await;
    let base = format!("/v1/zones/{}", zone["id"].as_str().unwrap());

    // Subject issuers: https only, unique while active, at most 20 a zone.
    let issuer = |n: usize| {
        json!({"issuer": format!("https://idp{n}.example"), "jwks_url": "https://idp.example/jwks", "audience": "a"})
            .to_string()
    };
    for n in 0..20 {
        let (status, _, body) = call(
            &app,
            "POST",
            &format!("{base}/subject-issuers"),
            w,
            &issuer(n),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, _, body) = call(
        &app,
        "POST",
        &format!("{base}/subject-issuers"),
        w,
        &issuer(0),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, Some("subject_issuer_conflict"))
    );
    let (status, _, body) = call(
        &app,
        "POST",
        &format!("{base}/subject-issuers"),
        w,
        &issuer(20),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, Some("zone_limit_exceeded"))
    );
    let (_, _, listed) = call(
        &app,
        "GET",
        &format!("{base}/subject-issuers?limit=500"),
        r,
        "",
    )
    .await;
    let first = listed["items"][19]["id"].as_str().unwrap().to_owned();
    let (status, _, _) = call(
        &app,
        "DELETE",
        &format!("{base}/subject-issuers/{first}"),
        r,
        "",
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a read token changes nothing"
    );
    let (status, _, _) = call(
        &app,
        "DELETE",
        &format!("{base}/subject-issuers/{first}"),
        w,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = call(
        &app,
        "GET",
        &format!("{base}/subject-issuers/{first}"),
        r,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, body) = call(
        &app,
        "POST",
        &format!("{base}/subject-issuers"),
        w,
        &issuer(0),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "an archived issuer frees its URL: {body}"
    );

    // Workloads: names unique, the secret shown once, revealed only with write capability.
    let (status, _, workload) = call(
        &app,
        "POST",
        &format!("{base}/workloads"),
        w,
        r#"{"name":"Nightly"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{workload}");
    let secret = workload["secret"].as_str().unwrap().to_owned();
    let (status, _, body) = call(
        &app,
        "POST",
        &format!("{base}/workloads"),
        w,
        r#"{"name":"nightly"}"#,
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, Some("workload_name_conflict"))
    );
    let path = format!("{base}/workloads/{}", workload["id"].as_str().unwrap());
    let (_, _, shown) = call(&app, "GET", &path, r, "").await;
    assert!(!shown.to_string().contains(&secret) && !shown.to_string().contains("_secret"));
    let (status, _, _) = call(&app, "GET", &format!("{path}/secret"), r, "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, revealed) = call(&app, "GET", &format!("{path}/secret"), w, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(revealed["secret"], secret.as_str());
    for (bindings, why) in [
        (json!([{"env": "PATH", "resource": "r"}]), "PATH"),
        (
            json!([{"env": "lower", "resource": "r"}]),
            "a lower-case name",
        ),
        (
            json!([{"env": "A", "resource": "r"}, {"env": "A", "resource": "s"}]),
            "a duplicate",
        ),
        (
            json!([{"env": "A", "resource": "r", "on_failure": "ignore"}]),
            "an unknown on_failure",
        ),
        (
            json!([{"env": "A", "resource": "r", "extra": 1}]),
            "an unknown field",
        ),
    ] {
        let (status, _, body) = call(
            &app,
            "PUT",
            &path,
            w,
            &json!({"bindings": bindings}).to_string(),
        )
        .await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::BAD_REQUEST, Some("invalid_body")),
            "{why}"
        );
    }
    let (_, _, unchanged) = call(&app, "GET", &path, r, "").await;
    assert_eq!(
        unchanged["bindings"],
        json!([]),
        "refused changes store nothing"
    );
}

/// The data directory of a test state (its replay directory's parent).
fn state_home(shared: &crate::state::Shared) -> std::path::PathBuf {
    shared.replay_dir.parent().unwrap().to_owned()
}

/// Stands in for the binary's validate and preserve: the API's authorisation around them is
/// what is tested here (the real tools run in `tests/console.rs` and `tests/incident.rs`).
struct RecordingTools(std::sync::Mutex<Vec<String>>);

#[async_trait::async_trait]
impl crate::recovery::OperatorTools for RecordingTools {
    async fn validate(
        &self,
        admin_token: &str,
        canary: &crate::recovery::Canary,
    ) -> Vec<crate::recovery::Check> {
        self.0
            .lock()
            .unwrap()
            .push(format!("validate {} {:?}", admin_token.len(), canary.zone));
        vec![crate::recovery::Check {
            name: "stand-in".to_owned(),
            ok: false,
            evidence: "seen".to_owned(),
        }]
    }

    async fn preserve(&self, out: &std::path::Path) -> Result<crate::recovery::Preserved, String> {
        std::fs::write(out.join("manifest.json"), "{}").map_err(|error| error.to_string())?;
        self.0.lock().unwrap().push("preserve".to_owned());
        Ok(crate::recovery::Preserved {
            failed: Vec::new(),
            unverified: Vec::new(),
            files: 1,
            key_id: "k".to_owned(),
        })
    }
}

#[tokio::test]
async fn validate_and_bundles_run_the_tools_only_for_the_callers_they_allow() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let reader = token(&shared, "read", TokenScope::Global).await;
    let zone_writer = token(&shared, "write", TokenScope::Zone("z".to_owned())).await;
    let (status, _, answer) = call(
        &router(state.clone()),
        "POST",
        "/v1/incident/validate",
        Some(&writer),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no tools: {answer}");
    assert_eq!(code(&answer), Some("not_found"));

    let tools = std::sync::Arc::new(RecordingTools(std::sync::Mutex::default()));
    let mut state = state;
    state.shared.operator_tools = Some(tools.clone());
    let app = router(state);
    let (status, _, answer) = call(&app, "POST", "/v1/incident/validate", Some(&reader), "").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["ok"], false, "the tools' verdict, not the API's");
    assert_eq!(answer["checks"][0]["evidence"], "seen");
    // Canaries act in the zone: a reader is refused, an unknown zone is not found.
    let (status, _, answer) = call(
        &app,
        "POST",
        "/v1/incident/validate",
        Some(&reader),
        r#"{"zone":"z"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let (status, _, _) = call(
        &app,
        "POST",
        "/v1/incident/validate",
        Some(&writer),
        r#"{"zone":"nowhere"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, answer) =
        call(&app, "POST", "/v1/incident/validate", Some(&writer), "[1").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");

    // Bundles: a deployment-wide writer only, with a reason.
    for (caller, expected) in [
        (&reader, "admin_token_read_only"),
        (&zone_writer, "admin_token_zone_mismatch"),
    ] {
        let (status, _, answer) = call(
            &app,
            "POST",
            "/v1/incident/bundles",
            Some(caller),
            r#"{"reason":"r"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
        assert_eq!(code(&answer), Some(expected));
    }
    let (status, _, answer) = call(
        &app,
        "POST",
        "/v1/incident/bundles",
        Some(&writer),
        r#"{"reason":" "}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(
        tools.0.lock().unwrap().as_slice(),
        [format!("validate {} None", reader.len())],
        "nothing refused reached the tools"
    );
    let (status, _, built) = call(
        &app,
        "POST",
        "/v1/incident/bundles",
        Some(&writer),
        r#"{"reason":"drill"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{built}");
    let name = built["name"].as_str().unwrap();
    let path = format!("/v1/incident/bundles/{name}");
    let (status, _, _) = call(&app, "GET", &path, Some(&reader), "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let response = app
        .clone()
        .oneshot(
            http::Request::get(&path)
                .header("authorization", format!("Bearer {writer}"))
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let archive = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(&archive[257..262], b"ustar", "a tar archive");
    let kept = state_home(&shared).join("bundles");
    for (path, mode) in [
        (kept.join(name), 0o700),
        (kept.join(format!("{name}.tar")), 0o600),
    ] {
        use std::os::unix::fs::PermissionsExt as _;
        let found = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(found, mode, "{}", path.display());
    }
    for bad in ["bundle-zz", "bundle-..", "other"] {
        let (status, _, answer) = call(
            &app,
            "GET",
            &format!("/v1/incident/bundles/{bad}"),
            Some(&writer),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{bad}: {answer}");
    }
    assert_eq!(
        tools.0.lock().unwrap().len(),
        2,
        "one validation, one bundle"
    );
}

#[tokio::test]
async fn an_operator_shortens_the_audit_retention_within_the_deployments_ceiling() {
    let (_keep, mut state) = role_state(Role::Api);
    state.shared.audit_retention = Some(std::time::Duration::from_secs(30 * 86_400));
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let reader = token(&shared, "read", TokenScope::Global).await;
    let zoned = token(&shared, "write", TokenScope::Zone("z".into())).await;
    let app = router(state);
    let path = "/v1/audit-retention";
    let (status, _, before) = call(&app, "GET", path, Some(&reader), "").await;
    assert_eq!(status, StatusCode::OK, "{before}");
    assert_eq!(
        (
            &before["retention_days"],
            &before["max_days"],
            &before["updated_by"]
        ),
        (&json!(30), &json!(30), &Value::Null)
    );
    for (bearer, body, status, expected) in [
        (
            &writer,
            r#"{"retention_days":31}"#,
            StatusCode::BAD_REQUEST,
            "retention_above_limit",
        ),
        (
            &writer,
            r#"{"retention_days":0}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            &writer,
            r#"{"retention_days":"7"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            &writer,
            r#"{"retention_days":7,"x":1}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            &reader,
            r#"{"retention_days":7}"#,
            StatusCode::FORBIDDEN,
            "admin_token_read_only",
        ),
        (
            &zoned,
            r#"{"retention_days":7}"#,
            StatusCode::FORBIDDEN,
            "admin_token_zone_mismatch",
        ),
    ] {
        let (got, _, answer) = call(&app, "PUT", path, Some(bearer), body).await;
        assert_eq!((got, code(&answer)), (status, Some(expected)), "{body}");
    }
    let (status, _, set) = call(&app, "PUT", path, Some(&writer), r#"{"retention_days":7}"#).await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(
        (&set["retention_days"], &set["max_days"]),
        (&json!(7), &json!(30))
    );
    assert!(set["updated_by"].as_str().unwrap().starts_with("admin:"));
    let (_, _, again) = call(&app, "PUT", path, Some(&writer), r#"{"retention_days":9}"#).await;
    assert_eq!(again["retention_days"], 9, "changed again in place");
    let recorded = audit_outbox(&shared).await;
    assert_eq!(
        recorded
            .iter()
            .filter(|(action, _)| action == "admin.audit_retention.update")
            .count(),
        2,
        "{recorded:?}"
    );
    // A freeze stops every change that could drop evidence.
    shared
        .store
        .set_containment(
            &caracal_store::Containment {
                kind: "freeze".into(),
                zone_id: String::new(),
                reason: "tamper drill".into(),
                actor: "test".into(),
                since_ms: caracal_store::now_ms(),
            },
            &[],
        )
        .await
        .unwrap();
    shared
        .containment
        .refresh(shared.store.as_ref())
        .await
        .unwrap();
    let (got, _, answer) = call(&app, "PUT", path, Some(&writer), r#"{"retention_days":1}"#).await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::LOCKED, Some("change_freeze"))
    );
    let (_, _, after) = call(&app, "GET", path, Some(&reader), "").await;
    assert_eq!(after["retention_days"], 9);
}

#[tokio::test]
async fn an_operator_lowers_the_mint_limit_within_the_deployments_ceiling() {
    let (_keep, mut state) = role_state(Role::Api);
    state.shared.mint_limit_ceiling = 100;
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let reader = token(&shared, "read", TokenScope::Global).await;
    let zoned = token(&shared, "write", TokenScope::Zone("z".into())).await;
    let app = router(state);
    let path = "/v1/mint-rate-limit";
    let (status, _, before) = call(&app, "GET", path, Some(&reader), "").await;
    assert_eq!(status, StatusCode::OK, "{before}");
    assert_eq!(
        (
            &before["limit_per_minute"],
            &before["max_per_minute"],
            &before["updated_by"]
        ),
        (&json!(100), &json!(100), &Value::Null)
    );
    for (bearer, body, status, expected) in [
        (
            &writer,
            r#"{"limit_per_minute":101}"#,
            StatusCode::BAD_REQUEST,
            "mint_rate_limit_above_limit",
        ),
        (
            &writer,
            r#"{"limit_per_minute":0}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            &writer,
            r#"{"limit_per_minute":-1}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (&writer, r#"{}"#, StatusCode::BAD_REQUEST, "invalid_body"),
        (
            &writer,
            r#"{"limit_per_minute":5,"zone":"z"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            &reader,
            r#"{"limit_per_minute":5}"#,
            StatusCode::FORBIDDEN,
            "admin_token_read_only",
        ),
        (
            &zoned,
            r#"{"limit_per_minute":5}"#,
            StatusCode::FORBIDDEN,
            "admin_token_zone_mismatch",
        ),
    ] {
        let (got, _, answer) = call(&app, "PUT", path, Some(bearer), body).await;
        assert_eq!((got, code(&answer)), (status, Some(expected)), "{body}");
    }
    let (status, _, set) = call(
        &app,
        "PUT",
        path,
        Some(&writer),
        r#"{"limit_per_minute":5}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(
        (&set["limit_per_minute"], &set["max_per_minute"]),
        (&json!(5), &json!(100))
    );
    assert!(set["updated_by"].as_str().unwrap().starts_with("admin:"));
    let stored = crate::sts::operator_mint_limit(shared.store.as_ref())
        .await
        .unwrap();
    assert_eq!(stored, Some(5), "what every STS replica reads");
    let recorded = audit_outbox(&shared).await;
    assert_eq!(
        recorded
            .iter()
            .filter(|(action, _)| action == "admin.mint_rate_limit.update")
            .count(),
        1,
        "{recorded:?}"
    );
    assert_eq!(
        call(&app, "GET", path, None, "").await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn the_overview_counts_what_a_dashboard_shows_for_one_zone() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let reader = token(&shared, "read", TokenScope::Global).await;
    let app = router(state);
    let w = Some(writer.as_str());
    let (_, _, zone) = call(&app, "POST", "/v1/zones", w, r#"{"name":"dash"}"#).await;
    let zone_id = zone["id"].as_str().unwrap().to_owned();
    let base = format!("/v1/zones/{zone_id}");
    let (_, _, provider) = call(
        &app,
        "POST",
        &format!("{base}/providers"),
        w,
        r#"{"name":"none","kind":"none"}"#,
    )
    .await;
    for (n, identifier) in ["resource://a", "resource://b"].iter().enumerate() {
        let body = json!({
            "name": format!("R{n}"), "identifier": identifier, "scopes": ["r:read"],
            "upstream_url": "http://127.0.0.1:9/api", "credential_provider_id": provider["id"],
            "operations": [{"method": "GET", "path": "/x", "scope": "r:read"}],
        });
        let (status, _, created) = call(
            &app,
            "POST",
            &format!("{base}/resources"),
            w,
            &body.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        if n == 1 {
            let one = format!("{base}/resources/{}", created["id"].as_str().unwrap());
            let patch = r#"{"operation_enforcement":"transport_uniform"}"#;
            let (status, _, patched) = call(&app, "PATCH", &one, w, patch).await;
            assert_eq!(status, StatusCode::OK, "{patched}");
        }
    }
    let (status, _, _) = call(
        &app,
        "POST",
        &format!("{base}/applications"),
        w,
        r#"{"name":"Billing","registration_method":"managed"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let now = caracal_store::now_ms();
    for (id, expires_at_ms) in [("dcr-soon", now + 3_600_000), ("dcr-past", now - 1)] {
        let application = caracal_store::Application {
            id: id.into(),
            zone_id: zone_id.clone(),
            name: id.into(),
            client_secret_hash: None,
            traits: Vec::new(),
            registration_method: "dcr".into(),
            expires_at_ms: Some(expires_at_ms),
            created_at_ms: now,
            archived_at_ms: None,
        };
        shared
            .store
            .create_application(&application, &[])
            .await
            .unwrap();
    }
    let events: Vec<caracal_store::AuditEvent> =
        [("ev-1", "allow"), ("ev-2", "deny"), ("ev-3", "allow")]
            .iter()
            .zip(1..)
            .map(|((id, decision), seq)| caracal_store::AuditEvent {
                id: (*id).into(),
                zone_id: zone_id.clone(),
                event_type: "gateway.request".into(),
                request_id: format!("req-{seq}"),
                decision: (*decision).into(),
                policy_set_id: None,
                policy_set_version_id: None,
                manifest_sha: None,
                evaluation_status: "complete".into(),
                determining_policies: "[]".into(),
                diagnostics: "[]".into(),
                metadata: "{}".into(),
                occurred_at_ms: now - 1000 + seq,
                ingested_at_ms: now,
                chain_seq: seq,
                content_sha256: "11".repeat(32),
                prev_content_sha256: "11".repeat(32),
                chain_mac: "22".repeat(32),
                chain_key_id: "chain-1".into(),
            })
            .collect();
    shared.store.insert_audit_events(&events).await.unwrap();

    let path = format!("{base}/overview");
    let (status, _, overview) = call(&app, "GET", &path, Some(&reader), "").await;
    assert_eq!(status, StatusCode::OK, "{overview}");
    assert_eq!(
        overview["applications"],
        json!({"total": 3, "active": 2, "expired": 1, "expiring_within_24h": 1})
    );
    assert_eq!(
        overview["resources"],
        json!({"total": 2, "transport_uniform": 1})
    );
    assert_eq!(overview["providers"], json!({"total": 1}));
    assert_eq!(overview["policy"], json!({"enforcing": false}));
    assert_eq!(overview["authority_records"], json!({"active": 0}));
    assert_eq!(
        overview["decisions_24h"],
        json!({"counts": {"allow": 2, "deny": 1}, "complete": true})
    );
    assert_eq!(overview["approvals"], json!({"pending": 0}));
    let newest: Vec<&str> = overview["recent_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["id"].as_str().unwrap())
        .collect();
    assert_eq!(newest, ["ev-3", "ev-2", "ev-1"]);

    let other = token(&shared, "read", TokenScope::Zone("zone-x".into())).await;
    for (bearer, status) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some(other.as_str()), StatusCode::FORBIDDEN),
    ] {
        let (got, _, body) = call(&app, "GET", &path, bearer, "").await;
        assert_eq!(got, status, "{body}");
    }
    let (got, _, body) = call(&app, "GET", "/v1/zones/nope/overview", Some(&reader), "").await;
    assert_eq!(
        (got, code(&body)),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}

#[tokio::test]
async fn subjects_are_listed_with_their_records_counted_and_move_to_revoked_on_the_kill_switch() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let reader = token(&shared, "read", TokenScope::Global).await;
    let app = router(state);
    let (_, _, zone) = call(&app, "POST", "/v1/zones", Some(&writer), r#"{"name":"s"}"#).await;
    let zone_id = zone["id"].as_str().unwrap().to_owned();
    let now = caracal_store::now_ms();
    let records: Vec<caracal_store::AuthorityRecord> = [
        ("user-a", "user"),
        ("user-a", "user"),
        ("user-a", "application"),
        ("user-b", "user"),
        ("robot-c", "application"),
    ]
    .iter()
    .enumerate()
    .map(|(n, (subject, kind))| caracal_store::AuthorityRecord {
        id: format!("ar-{n}"),
        zone_id: zone_id.clone(),
        session_type: (*kind).into(),
        subject_id: (*subject).into(),
        parent_id: None,
        status: "active".into(),
        claims: "{}".into(),
        expires_at_ms: now + 600_000,
        authenticated_at_ms: now,
        created_at_ms: now,
        revoked_at_ms: None,
        revoked_reason: None,
    })
    .collect();
    shared
        .store
        .insert_authority_records(&records)
        .await
        .unwrap();

    let base = format!("/v1/zones/{zone_id}/subjects");
    let get = async |query: &str| {
        let (status, _, body) =
            call(&app, "GET", &format!("{base}{query}"), Some(&reader), "").await;
        (status, body)
    };
    let rows = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                format!(
                    "{}/{}={}",
                    row["subject_id"].as_str().unwrap(),
                    row["kind"].as_str().unwrap(),
                    row["authority_records"]["active"]
                )
            })
            .collect()
    };
    let (status, first) = get("?limit=2").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(
        rows(&first),
        ["robot-c/application=1", "user-a/application=1"]
    );
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = get(&format!("?limit=2&cursor={cursor}")).await;
    assert_eq!(rows(&second), ["user-a/user=2", "user-b/user=1"]);
    let (_, last) = get(&format!(
        "?limit=2&cursor={}",
        second["next_cursor"].as_str().unwrap()
    ))
    .await;
    assert_eq!((rows(&last).len(), &last["next_cursor"]), (0, &Value::Null));
    let (_, searched) = get("?search=USER&kind=user").await;
    assert_eq!(rows(&searched), ["user-a/user=2", "user-b/user=1"]);
    for query in [
        "?kind=robot",
        "?limit=201",
        "?limit=0",
        "?cursor=%21",
        "?search=",
        "?color=red",
    ] {
        let (status, body) = get(query).await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "{query}"
        );
    }

    let (status, overview) = get("/overview?subject_id=user-a").await;
    assert_eq!(status, StatusCode::OK, "{overview}");
    assert_eq!(
        overview["authority_records"],
        json!({"active": 3, "revoked": 0, "expired": 0})
    );
    assert_eq!(overview["kinds"].as_array().unwrap().len(), 2);
    let (status, body) = get("/overview?subject_id=nobody").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (status, body) = get("/overview").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );

    let (status, _, revoked) = call(
        &app,
        "POST",
        &format!("{base}/revoke"),
        Some(&writer),
        r#"{"subject_id":"user-a"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    let (_, overview) = get("/overview?subject_id=user-a").await;
    assert_eq!(
        overview["authority_records"],
        json!({"active": 0, "revoked": 3, "expired": 0})
    );
}

#[tokio::test]
async fn reachability_tests_go_through_the_address_guard_are_recorded_and_budgeted() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let reader = token(&shared, "read", TokenScope::Global).await;
    let app = router(state);
    let w = Some(writer.as_str());
    // An upstream that answers HEAD with 204, its discovery document (naming itself as the
    // issuer, wherever it is asked for) with 200, and counts what it was sent.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let upstream = axum::Router::new().fallback({
        let seen = seen.clone();
        move |request: axum::extract::Request| async move {
            let authorization = request.headers().get("authorization").is_some();
            seen.lock().unwrap().push(format!(
                "{} {} {authorization}",
                request.method(),
                request.uri().path()
            ));
            if request
                .uri()
                .path()
                .ends_with("/.well-known/openid-configuration")
            {
                let document = json!({
                    "issuer": format!("http://{address}"),
                    "token_endpoint": format!("http://{address}/oauth/token"),
                    "jwks_uri": format!("http://{address}/jwks"),
                    "grant_types_supported": ["client_credentials"],
                });
                return axum::response::IntoResponse::into_response(axum::Json(document));
            }
            axum::response::IntoResponse::into_response(StatusCode::NO_CONTENT)
        }
    });
    tokio::spawn(async move { axum::serve(listener, upstream).await.unwrap() });
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };

    let (_, _, zone) = call(&app, "POST", "/v1/zones", w, r#"{"name":"reach"}"#).await;
    let base = format!("/v1/zones/{}", zone["id"].as_str().unwrap());
    let create = async |path: &str, body: Value| {
        let (status, _, created) = call(
            &app,
            "POST",
            &format!("{base}/{path}"),
            w,
            &body.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created["id"].as_str().unwrap().to_owned()
    };
    let none = create("providers", json!({"name": "none", "kind": "none"})).await;
    let oauth = create(
        "providers",
        json!({"name": "idp", "kind": "oauth2_client_credentials", "config_json": {
            "token_url": format!("http://{address}/oauth/token"), "client_id": "c",
            "client_secret": "s3cret"}}),
    )
    .await;
    let mut resources = Vec::new();
    for (n, url) in [
        format!("http://{address}/api"),
        format!("http://{closed}/api"),
        "http://169.254.169.254/latest".to_owned(),
    ]
    .iter()
    .enumerate()
    {
        let body = json!({
            "name": format!("R{n}"), "identifier": format!("resource://r{n}"), "scopes": ["r:read"],
            "upstream_url": url, "credential_provider_id": none,
        });
        resources.push(create("resources", body).await);
    }
    let test = async |path: String, bearer: &str| call(&app, "POST", &path, Some(bearer), "").await;

    let (status, _, answer) =
        test(format!("{base}/resources/{}/test", resources[0]), &writer).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        (&answer["reachable"], &answer["status"]),
        (&json!(true), &json!(204))
    );
    let (_, _, answer) = test(format!("{base}/resources/{}/test", resources[1]), &writer).await;
    assert_eq!(
        (&answer["reachable"], &answer["error"]),
        (&json!(false), &json!("upstream_unreachable"))
    );
    let (_, _, answer) = test(format!("{base}/resources/{}/test", resources[2]), &writer).await;
    assert_eq!(
        (&answer["reachable"], &answer["error"]),
        (&json!(false), &json!("upstream_not_addressable")),
        "the metadata address is never dialled"
    );
    let (_, _, answer) = test(format!("{base}/providers/{oauth}/test"), &writer).await;
    assert_eq!(
        (&answer["reachable"], &answer["status"]),
        (&json!(true), &json!(204))
    );
    assert_eq!(
        *seen.lock().unwrap(),
        ["HEAD /api false", "HEAD /oauth/token false"],
        "one credential-less HEAD each"
    );
    // Discovery: the document must name the issuer asked about.
    let discover = async |issuer: String| {
        let body = json!({ "issuer": issuer }).to_string();
        call(
            &app,
            "POST",
            &format!("{base}/providers/discovery"),
            w,
            &body,
        )
        .await
    };
    let (status, _, found) = discover(format!("http://{address}/")).await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(
        found["suggested_config"]["token_url"],
        format!("http://{address}/oauth/token")
    );
    assert_eq!(
        found["grant_types_supported"],
        json!(["client_credentials"])
    );
    for (issuer, status, expected) in [
        (
            format!("http://{address}/tenant"),
            StatusCode::BAD_GATEWAY,
            "discovery_failed",
        ),
        (
            "https://169.254.169.254".to_owned(),
            StatusCode::BAD_GATEWAY,
            "discovery_failed",
        ),
        (
            "http://idp.example".to_owned(),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            format!("http://{address}?x=1"),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
    ] {
        let (got, _, answer) = discover(issuer.clone()).await;
        assert_eq!(
            (got, code(&answer)),
            (status, Some(expected)),
            "{issuer}: {answer}"
        );
    }
    let (status, _, answer) = test(format!("{base}/providers/{none}/test"), &writer).await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    let (status, _, answer) = test(format!("{base}/resources/nope/test"), &writer).await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (status, _, _) = test(format!("{base}/resources/{}/test", resources[0]), &reader).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let recorded = shared
        .bus
        .streams
        .range(caracal_bus::stream_names::AUDIT_EVENTS, None, 100)
        .await
        .unwrap();
    let tests = |kind: &str| {
        recorded
            .iter()
            .filter(|entry| entry.fields["data"].contains(&format!("\"admin.{kind}.test\"")))
            .count()
    };
    assert_eq!(
        (tests("resource"), tests("provider")),
        (3, 1),
        "each test recorded"
    );
    let discoveries = recorded
        .iter()
        .filter(|entry| entry.fields["data"].contains("\"admin.provider.discovery\""))
        .count();
    assert_eq!(
        discoveries, 3,
        "each discovery that reached the network recorded"
    );

    // Ten a minute per zone (refusals before the test do not count): the four above, six more, then 429 with Retry-After (unless the
    // minute turned over in between, when the next ten pass and the eleventh is refused).
    let path = format!("{base}/resources/{}/test", resources[2]);
    let mut refused = None;
    for _ in 0..24 {
        let (status, headers, _) = test(path.clone(), &writer).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(headers);
            break;
        }
        assert_eq!(status, StatusCode::OK);
    }
    let headers = refused.expect("the budget refuses within a minute's tests");
    assert!(headers.contains_key(http::header::RETRY_AFTER));
}

#[tokio::test]
async fn an_operator_lists_dead_outbox_rows_and_sends_them_again_on_the_record() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let reader = token(&shared, "read", TokenScope::Global).await;
    let zoned = token(&shared, "write", TokenScope::Zone("z".into())).await;
    let app = router(state);
    for name in ["a", "b"] {
        let body = json!({ "name": name }).to_string();
        let (status, _, _) = call(&app, "POST", "/v1/zones", Some(&writer), &body).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    // Every row the zones wrote fails once against a bound of one: all dead.
    let rows = shared
        .store
        .claim_outbox("test", 100, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    assert!(!rows.is_empty());
    for row in &rows {
        shared
            .store
            .outbox_failed(row.id, "bus down", std::time::Duration::ZERO, 1)
            .await
            .unwrap();
    }
    let (status, _, dead) = call(&app, "GET", "/v1/outbox/dead", Some(&reader), "").await;
    assert_eq!(status, StatusCode::OK, "{dead}");
    let total = rows.len() as u64;
    assert_eq!(dead["dead_total"], total);
    assert_eq!(dead["items"][0]["last_error"], "bus down");
    assert_eq!(dead["items"][0].get("fields"), None, "no payload");
    let first = dead["items"][0]["id"].as_i64().unwrap();
    let one = format!("/v1/outbox/{first}/requeue");
    for (bearer, method, path) in [
        (&zoned, "GET", "/v1/outbox/dead"),
        (&reader, "POST", one.as_str()),
        (&zoned, "POST", "/v1/outbox/requeue-dead"),
    ] {
        let (got, _, body) = call(&app, method, path, Some(bearer), "").await;
        assert_eq!(got, StatusCode::FORBIDDEN, "{path}: {body}");
    }
    let (status, _, answer) = call(&app, "POST", &one, Some(&writer), "").await;
    assert_eq!(
        (status, &answer["requeued"]),
        (StatusCode::OK, &json!(1)),
        "{answer}"
    );
    for path in [
        one.as_str(),
        "/v1/outbox/abc/requeue",
        "/v1/outbox/-1/requeue",
    ] {
        let (status, _, body) = call(&app, "POST", path, Some(&writer), "").await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{path}"
        );
    }
    let (status, _, answer) =
        call(&app, "POST", "/v1/outbox/requeue-dead", Some(&writer), "").await;
    assert_eq!(
        (status, &answer["requeued"]),
        (StatusCode::OK, &json!(total - 1))
    );
    let (_, _, dead) = call(&app, "GET", "/v1/outbox/dead", Some(&reader), "").await;
    assert_eq!(
        (&dead["dead_total"], &dead["items"]),
        (&json!(0), &json!([]))
    );
    let (status, _, answer) =
        call(&app, "POST", "/v1/outbox/requeue-dead", Some(&writer), "").await;
    assert_eq!((status, &answer["requeued"]), (StatusCode::OK, &json!(0)));
    // Two requeues changed something, and each was recorded with its change.
    let recorded = audit_outbox(&shared).await;
    assert_eq!(
        types(&recorded)
            .iter()
            .filter(|kind| **kind == "admin.outbox.requeue")
            .count(),
        2,
        "{recorded:?}"
    );
}

#[tokio::test]
async fn notification_sinks_are_sent_each_approval_event_signed_and_retried_on_the_record() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let reader = token(&shared, "read", TokenScope::Global).await;
    let app = router(state);
    let w = Some(writer.as_str());
    let metrics = std::sync::Arc::new(crate::metrics::NotifierMetrics::default());
    // A receiver that records what it is sent and answers 500 until told otherwise.
    type Received = Vec<(http::HeaderMap, String)>;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Received::new()));
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let receiver = axum::Router::new().fallback({
        let (received, healthy) = (received.clone(), healthy.clone());
        move |headers: http::HeaderMap, body: String| async move {
            received.lock().unwrap().push((headers, body));
            if healthy.load(std::sync::atomic::Ordering::SeqCst) {
                StatusCode::NO_CONTENT
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    });
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });

    let (_, _, zone) = call(&app, "POST", "/v1/zones", w, r#"{"name":"notify"}"#).await;
    let zone_id = zone["id"].as_str().unwrap().to_owned();
    let base = format!("/v1/zones/{zone_id}/notification-sinks");
    let url = format!("http://{address}/hooks");

    // Bad input: each refused with its code, nothing stored.
    for body in [
        json!({"name": "x", "url": "http://hooks.example/x"}),
        json!({"name": "x", "url": "https://user:pw@hooks.example/x"}),
        json!({"name": "x", "url": "http://169.254.169.254/latest"}),
        json!({"name": "x", "url": "https://169.254.169.254/latest"}),
        json!({"name": "x", "url": "ftp://127.0.0.1/x"}),
        json!({"name": "x", "url": url, "event_types": []}),
        json!({"name": "x", "url": url, "event_types": ["token_exchange"]}),
        json!({"name": "x", "url": url, "event_types": ["step_up_issued", "step_up_issued"]}),
        json!({"name": "", "url": url}),
        json!({"name": "x", "url": url, "secret": "mine"}),
    ] {
        let (got, _, answer) = call(&app, "POST", &base, w, &body.to_string()).await;
        assert_eq!(
            (got, code(&answer)),
            (StatusCode::BAD_REQUEST, Some("invalid_body")),
            "{body}: {answer}"
        );
    }
    let (got, _, _) = call(
        &app,
        "POST",
        &base,
        Some(&reader),
        r#"{"name":"x","url":"https://a.example"}"#,
    )
    .await;
    assert_eq!(got, StatusCode::FORBIDDEN, "a read token cannot add a sink");

    let body = json!({"name": "approvals", "url": url, "event_types": ["step_up_issued", "step_up_decided"]});
    let (status, _, created) = call(&app, "POST", &base, w, &body.to_string()).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("nsk_"), "{created}");
    let sink_id = created["id"].as_str().unwrap().to_owned();
    let (_, _, read) = call(&app, "GET", &format!("{base}/{sink_id}"), Some(&reader), "").await;
    assert!(
        read.get("secret").is_none() && !read.to_string().contains(&secret),
        "{read}"
    );
    assert_eq!(read["active"], true);

    // Approval events in the ledger: one issued, one decided, one consumed (not subscribed),
    // and an event of another kind.
    let now = caracal_store::now_ms();
    let ledger_row =
        |id: &str, event_type: &str, seq: i64, metadata: Value| caracal_store::AuditEvent {
            id: id.into(),
            zone_id: zone_id.clone(),
            event_type: event_type.into(),
            request_id: format!("req-{seq}"),
            decision: "allow".into(),
            policy_set_id: None,
            policy_set_version_id: None,
            manifest_sha: None,
            evaluation_status: "complete".into(),
            determining_policies: "[]".into(),
            diagnostics: "[]".into(),
            metadata: metadata.to_string(),
            occurred_at_ms: now + seq,
            ingested_at_ms: now + seq,
            chain_seq: seq,
            content_sha256: "11".repeat(32),
            prev_content_sha256: "11".repeat(32),
            chain_mac: "22".repeat(32),
            chain_key_id: "chain-1".into(),
        };
    shared
        .store
        .insert_audit_events(&[
            ledger_row("ev-issued", "step_up_issued", 1, json!({"challenge_id": "h1", "privacy_mode": "identified"})),
            ledger_row("ev-other", "token_exchange", 2, json!({})),
            ledger_row("ev-decided", "step_up_decided", 3, json!({"challenge_id": "h1", "privacy_mode": "pseudonymous", "approver_id": "subject:u1", "decision": "approved"})),
            ledger_row("ev-consumed", "step_up_consumed", 4, json!({"challenge_id": "h1"})),
        ])
        .await
        .unwrap();

    // The first round sends both subscribed events; the receiver fails them.
    crate::notifier::run_once(&shared, &metrics).await;
    let first: Received = std::mem::take(&mut *received.lock().unwrap());
    assert_eq!(first.len(), 2, "two subscribed events");
    let mut sent_types: Vec<String> = first
        .iter()
        .map(|(headers, _)| headers["x-caracal-event"].to_str().unwrap().to_owned())
        .collect();
    sent_types.sort();
    assert_eq!(sent_types, ["step_up_decided", "step_up_issued"]);
    for (headers, body) in &first {
        let timestamp = headers["x-caracal-timestamp"].to_str().unwrap();
        assert_eq!(
            headers["x-caracal-signature"].to_str().unwrap(),
            crate::notifier::signature(secret.as_bytes(), timestamp, body),
            "signed with the sink's secret over the timestamp and the body"
        );
        assert_eq!(headers["x-caracal-sink"].to_str().unwrap(), sink_id);
        let payload: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            payload["id"],
            headers["x-caracal-delivery"].to_str().unwrap()
        );
        assert_eq!(payload["zone_id"], zone_id.as_str());
        assert_eq!(payload["data"]["challenge_id"], "h1");
        assert!(
            payload["data"].get("approver_id").is_none(),
            "not identified: {payload}"
        );
    }
    let deliveries_path = format!("{base}/{sink_id}/deliveries");
    let (_, _, listed) = call(&app, "GET", &deliveries_path, Some(&reader), "").await;
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{listed}");
    assert!(
        items
            .iter()
            .all(|d| d["state"] == "pending" && d["attempts"] == 1 && d["response_status"] == 500),
        "{listed}"
    );
    let (_, _, health) = call(&app, "GET", &format!("{base}/{sink_id}"), Some(&reader), "").await;
    assert_eq!(health["consecutive_failures"], 2);
    assert_eq!((metrics.retried.get(), metrics.delivered.get()), (2, 0));
    assert_eq!(health["last_error"], "answered 500 Internal Server Error");

    // Nothing is due again before its backoff; a repeat round sends nothing new.
    crate::notifier::run_once(&shared, &metrics).await;
    assert!(received.lock().unwrap().is_empty());
    // Once due (their backoff cut short here) and the receiver healthy, each is delivered
    // once, and the sink recovers.
    let cut_short = caracal_store::DeliveryOutcome::Failed {
        status: None,
        error: "backoff cut short".into(),
        retry_at_ms: Some(0),
    };
    for pending in shared
        .store
        .list_notification_deliveries(&sink_id, None, 10)
        .await
        .unwrap()
    {
        shared
            .store
            .settle_notification(&pending, &cut_short, now)
            .await
            .unwrap();
    }
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    crate::notifier::run_once(&shared, &metrics).await;
    assert_eq!(received.lock().unwrap().len(), 2);
    let (_, _, listed) = call(
        &app,
        "GET",
        &format!("{deliveries_path}?limit=1"),
        Some(&reader),
        "",
    )
    .await;
    assert_eq!(listed["items"][0]["state"], "delivered", "{listed}");
    assert_eq!(listed["items"][0]["response_status"], 204);
    let cursor = listed["next_cursor"].as_str().unwrap();
    let (_, _, rest) = call(
        &app,
        "GET",
        &format!("{deliveries_path}?limit=1&cursor={cursor}"),
        Some(&reader),
        "",
    )
    .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert!(rest["next_cursor"].is_null());
    let (_, _, health) = call(&app, "GET", &format!("{base}/{sink_id}"), Some(&reader), "").await;
    assert_eq!(health["consecutive_failures"], 0);
    assert_eq!(metrics.delivered.get(), 2);
    assert!(health["last_success_at"].as_str().is_some());

    // Rotation: a new secret signs what is sent next; a paused sink is sent nothing.
    let issue_and_run = async |id: &str, seq: i64| {
        let row = ledger_row(id, "step_up_issued", seq, json!({"challenge_id": id}));
        shared.store.insert_audit_events(&[row]).await.unwrap();
        received.lock().unwrap().clear();
        crate::notifier::run_once(&shared, &metrics).await;
    };
    let (status, _, rotated) = call(
        &app,
        "POST",
        &format!("{base}/{sink_id}/rotate-secret"),
        w,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let rotated_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(rotated_secret, secret);
    issue_and_run("ev-issued-2", 5).await;
    let (headers, body) = received.lock().unwrap()[0].clone();
    let timestamp = headers["x-caracal-timestamp"].to_str().unwrap();
    assert_eq!(
        headers["x-caracal-signature"].to_str().unwrap(),
        crate::notifier::signature(rotated_secret.as_bytes(), timestamp, &body)
    );
    let (status, _, paused) = call(
        &app,
        "PATCH",
        &format!("{base}/{sink_id}"),
        w,
        r#"{"active":false}"#,
    )
    .await;
    assert_eq!(
        (status, &paused["active"]),
        (StatusCode::OK, &json!(false)),
        "{paused}"
    );
    issue_and_run("ev-issued-3", 6).await;
    assert!(
        received.lock().unwrap().is_empty(),
        "a paused sink is sent nothing"
    );
    let (got, _, answer) = call(&app, "PATCH", &format!("{base}/{sink_id}"), w, "{}").await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::BAD_REQUEST, Some("invalid_body"))
    );

    // At most 20 a zone.
    for n in 1..20 {
        let body = json!({"name": format!("sink {n}"), "url": url});
        let (status, _, _) = call(&app, "POST", &base, w, &body.to_string()).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (got, _, answer) = call(
        &app,
        "POST",
        &base,
        w,
        &json!({"name": "one more", "url": url}).to_string(),
    )
    .await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::CONFLICT, Some("zone_limit_exceeded")),
        "{answer}"
    );

    // Deleting takes its deliveries; every change is on the record, no secret in it.
    let (status, _, _) = call(&app, "DELETE", &format!("{base}/{sink_id}"), w, "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (got, _, _) = call(&app, "GET", &deliveries_path, Some(&reader), "").await;
    assert_eq!(got, StatusCode::NOT_FOUND);
    let events = audit_outbox(&shared).await;
    let recorded: Vec<&str> = types(&events)
        .into_iter()
        .filter(|t| t.starts_with("admin.notification_sink"))
        .collect();
    assert_eq!(
        &recorded[..4],
        [
            "admin.notification_sink.create",
            "admin.notification_sink.rotate_secret",
            "admin.notification_sink.update",
            "admin.notification_sink.create"
        ]
    );
    assert_eq!(recorded.last(), Some(&"admin.notification_sink.delete"));
    assert!(
        events
            .iter()
            .all(|(_, event)| !event.contains(&secret) && !event.contains(&rotated_secret))
    );
}

#[tokio::test]
async fn dynamic_client_registration_is_offered_per_zone_and_shut_down_on_the_record() {
    let (_keep, state) = role_state(Role::Api);
    let shared = state.shared.clone();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let app = router(state);
    let w = Some(writer.as_str());
    let (status, _, zone) = call(
        &app,
        "POST",
        "/v1/zones",
        w,
        r#"{"name":"agents","dcr_enabled":true}"#,
    )
    .await;
    assert_eq!(
        (status, &zone["dcr_enabled"]),
        (StatusCode::CREATED, &json!(true)),
        "{zone}"
    );
    let zone_id = zone["id"].as_str().unwrap().to_owned();
    let base = format!("/v1/zones/{zone_id}");
    let (_, _, closed) = call(&app, "POST", "/v1/zones", w, r#"{"name":"closed"}"#).await;
    let closed_id = closed["id"].as_str().unwrap();
    let register = |zone: &str, body: Value| {
        let app = app.clone();
        let path = format!("/v1/zones/{zone}/applications/dcr");
        async move { call(&app, "POST", &path, w, &body.to_string()).await }
    };

    // A zone that does not accept registration refuses it; bad bodies are refused.
    let (got, _, answer) = register(closed_id, json!({"name": "a"})).await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::FORBIDDEN, Some("dcr_disabled")),
        "{answer}"
    );
    for body in [
        json!({"name": "a", "expires_in": 0}),
        json!({"name": "a", "expires_in": 3601}),
        json!({"name": "a", "traits": ["x"]}),
        json!({"name": ""}),
    ] {
        let (got, _, answer) = register(&zone_id, body.clone()).await;
        assert_eq!(
            (got, code(&answer)),
            (StatusCode::BAD_REQUEST, Some("invalid_body")),
            "{body}: {answer}"
        );
    }
    let (got, _, registered) = register(&zone_id, json!({"name": "agent-1"})).await;
    assert_eq!(got, StatusCode::CREATED, "{registered}");
    assert_eq!(registered["registration_method"], "dcr");
    assert!(
        registered["client_secret"]
            .as_str()
            .unwrap()
            .starts_with("cs_")
    );
    assert!(registered["expires_at"].as_str().is_some());
    let first = registered["id"].as_str().unwrap().to_owned();
    let (_, _, status_now) = call(&app, "GET", &format!("{base}/dcr-status"), w, "").await;
    assert_eq!(
        status_now,
        json!({"dcr_enabled": true, "live_dcr_applications": 1})
    );

    // Turning registration off while one lives needs a choice; revoke_live archives it and
    // revokes what it holds.
    let now = caracal_store::now_ms();
    shared
        .store
        .insert_authority_records(&[caracal_store::AuthorityRecord {
            id: "ar-dcr".into(),
            zone_id: zone_id.clone(),
            session_type: "application".into(),
            subject_id: first.clone(),
            parent_id: None,
            status: "active".into(),
            claims: "{}".into(),
            expires_at_ms: now + 600_000,
            authenticated_at_ms: now,
            created_at_ms: now,
            revoked_at_ms: None,
            revoked_reason: None,
        }])
        .await
        .unwrap();
    let (got, _, answer) = call(&app, "PATCH", &base, w, r#"{"dcr_enabled":false}"#).await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::CONFLICT, Some("dcr_shutdown_required")),
        "{answer}"
    );
    assert_eq!(answer["details"]["live_dcr_applications"], 1, "{answer}");
    let (got, _, answer) = call(
        &app,
        "PATCH",
        &base,
        w,
        r#"{"dcr_enabled":false,"dcr_shutdown":"later"}"#,
    )
    .await;
    assert_eq!(
        (got, code(&answer)),
        (StatusCode::BAD_REQUEST, Some("invalid_body"))
    );
    let (got, _, off) = call(
        &app,
        "PATCH",
        &base,
        w,
        r#"{"dcr_enabled":false,"dcr_shutdown":"revoke_live"}"#,
    )
    .await;
    assert_eq!(
        (got, &off["dcr_enabled"]),
        (StatusCode::OK, &json!(false)),
        "{off}"
    );
    let (got, _, _) = call(&app, "GET", &format!("{base}/applications/{first}"), w, "").await;
    assert_eq!(got, StatusCode::NOT_FOUND, "archived");
    let record = shared
        .store
        .get_authority_record(&zone_id, "ar-dcr")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.status, "revoked");
    let (got, _, _) = register(&zone_id, json!({"name": "agent-2"})).await;
    assert_eq!(got, StatusCode::FORBIDDEN);
    // A client that registered while the shutdown ran (written here behind the API's back) is
    // revoked by asking again: revoke_live is not gated on the zone's earlier state.
    let now = caracal_store::now_ms();
    shared
        .store
        .create_application(
            &caracal_store::Application {
                id: "straggler".into(),
                zone_id: zone_id.clone(),
                name: "straggler".into(),
                client_secret_hash: None,
                traits: vec![],
                registration_method: "dcr".into(),
                expires_at_ms: Some(now + 600_000),
                created_at_ms: now,
                archived_at_ms: None,
            },
            &[],
        )
        .await
        .unwrap();
    let (got, _, _) = call(
        &app,
        "PATCH",
        &base,
        w,
        r#"{"dcr_enabled":false,"dcr_shutdown":"revoke_live"}"#,
    )
    .await;
    assert_eq!(got, StatusCode::OK);
    let (got, _, _) = call(
        &app,
        "GET",
        &format!("{base}/applications/straggler"),
        w,
        "",
    )
    .await;
    assert_eq!(got, StatusCode::NOT_FOUND, "the straggler is archived");

    // keep_live leaves them to run out; a day past expiry the retention job archives them.
    call(&app, "PATCH", &base, w, r#"{"dcr_enabled":true}"#).await;
    let (_, _, kept) = register(&zone_id, json!({"name": "agent-3", "expires_in": 1})).await;
    let kept = kept["id"].as_str().unwrap().to_owned();
    let (got, _, _) = call(
        &app,
        "PATCH",
        &base,
        w,
        r#"{"dcr_enabled":false,"dcr_shutdown":"keep_live"}"#,
    )
    .await;
    assert_eq!(got, StatusCode::OK);
    let (got, _, _) = call(&app, "GET", &format!("{base}/applications/{kept}"), w, "").await;
    assert_eq!(got, StatusCode::OK, "kept live");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        shared
            .store
            .archive_lapsed_dcr_applications(caracal_store::now_ms())
            .await
            .unwrap(),
        1
    );
    let events = audit_outbox(&shared).await;
    let recorded = types(&events);
    for action in [
        "admin.application.register",
        "admin.application.archive",
        "admin.zone.update",
    ] {
        assert!(recorded.contains(&action), "{action}: {recorded:?}");
    }
    assert!(
        events
            .iter()
            .all(|(_, event)| !event.contains(registered["client_secret"].as_str().unwrap()))
    );
}
