#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caracal_core::Role;
use caracal_crypto::es256::PublicKey;
use caracal_store::{DelegationEdge, Session, TokenScope};
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::Sts;
use crate::evidence::{Evidence, EvidenceConfig};
use crate::router;
use crate::state::{Bus, RoleState, Shared};
use crate::test_support::{SwitchableStore, call, switchable_shared, token};
use crate::wire::{Jwks, MandateClaims};

const ISSUER: &str = "http://sts.test";

/// A zone with an application, a resource it owns, and an active grants policy; the API and
/// STS roles over one store that a test can take down.
pub(crate) struct World {
    pub(crate) _keep: (tempfile::TempDir, crate::evidence::EvidenceTasks),
    pub(crate) store: Arc<SwitchableStore>,
    pub(crate) shared: Shared,
    pub(crate) api: axum::Router,
    pub(crate) sts: axum::Router,
    pub(crate) core: Arc<Sts>,
    pub(crate) writer: String,
    pub(crate) zone_id: String,
    pub(crate) app_id: String,
    pub(crate) secret: String,
}

fn document(app_id: &str) -> String {
    format!(
        "# caracal:data-document\npackage caracal.authz\nimport rego.v1\napp_ids := {{\"billing\": \"{app_id}\"}}\ngrants := {{\"resource://ledger\": {{\"application\": \"billing\", \"roles\": {{\"{app_id}\": [\"ledger:read\", \"ledger:refund\"]}}}}}}\n"
    )
}

pub(crate) async fn world() -> World {
    let (keep, store, shared) = switchable_shared();
    let writer = token(&shared, "write", TokenScope::Global).await;
    let api = router(RoleState::new(Role::Api, shared.clone()));
    let w = Some(writer.as_str());
    let (status, _, zone) = call(&api, "POST", "/v1/zones", w, r#"{"name":"sts"}"#).await;
    assert_eq!(status, StatusCode::CREATED, "{zone}");
    let zone_id = zone["id"].as_str().unwrap().to_owned();
    let base = format!("/v1/zones/{zone_id}");
    let (status, _, app) = call(
        &api,
        "POST",
        &format!("{base}/applications"),
        w,
        r#"{"name":"billing","registration_method":"managed"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{app}");
    let app_id = app["id"].as_str().unwrap().to_owned();
    let secret = app["client_secret"].as_str().unwrap().to_owned();
    let (_, _, provider) = call(
        &api,
        "POST",
        &format!("{base}/providers"),
        w,
        r#"{"name":"none","kind":"none"}"#,
    )
    .await;
    let resource = json!({
        "name": "Ledger", "identifier": "resource://ledger", "scopes": ["ledger:read", "ledger:refund"],
        "upstream_url": "http://127.0.0.1:9/api", "credential_provider_id": provider["id"],
        "operations": [{"method": "GET", "path": "/entries", "scope": "ledger:read"},
                       {"method": "POST", "path": "/refunds", "scope": "ledger:refund"}],
    });
    let (status, _, created) = call(
        &api,
        "POST",
        &format!("{base}/resources"),
        w,
        &resource.to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");

    let mut sts_state = RoleState::new(Role::Sts, shared.clone());
    let sts = Arc::new(Sts::start(
        ISSUER.to_owned(),
        crate::policy::PolicyCache::default(),
        shared.store.clone(),
        &shared.kek,
    ));
    sts_state.sts = Some(Arc::clone(&sts));
    let world = World {
        _keep: keep,
        store,
        shared,
        api,
        sts: router(sts_state),
        core: Arc::clone(&sts),
        writer,
        zone_id,
        app_id,
        secret,
    };
    world.activate(&document(&world.app_id)).await;
    sts.policies
        .refresh_all(world.shared.store.as_ref(), "sts-test")
        .await
        .unwrap();
    world
}

impl World {
    pub(crate) async fn activate(&self, content: &str) {
        let w = Some(self.writer.as_str());
        let base = format!("/v1/zones/{}", self.zone_id);
        let (status, _, policy) = call(
            &self.api,
            "POST",
            &format!("{base}/policies"),
            w,
            &json!({"name": format!("p{}", uuid::Uuid::now_v7().simple()), "content": content})
                .to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{policy}");
        let (_, _, set) = call(
            &self.api,
            "POST",
            &format!("{base}/policy-sets"),
            w,
            &json!({"name": format!("s{}", uuid::Uuid::now_v7().simple())}).to_string(),
        )
        .await;
        let sets = format!("{base}/policy-sets/{}", set["id"].as_str().unwrap());
        let (_, _, version) = call(
            &self.api,
            "POST",
            &format!("{sets}/versions"),
            w,
            &json!({"manifest": [{"policy_version_id": policy["version_id"]}]}).to_string(),
        )
        .await;
        let (status, _, body) = call(
            &self.api,
            "POST",
            &format!("{sets}/activate"),
            w,
            &json!({"version_id": version["id"]}).to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }

    pub(crate) fn form(&self, extra: &[(&str, &str)]) -> String {
        let mut fields = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("zone_id", self.zone_id.as_str()),
            ("application_id", self.app_id.as_str()),
            ("client_secret", self.secret.as_str()),
        ];
        fields.extend_from_slice(extra);
        serde_urlencoded::to_string(fields).unwrap()
    }

    pub(crate) async fn exchange(&self, body: &str) -> (StatusCode, http::HeaderMap, Value) {
        self.post("/oauth/2/token", "application/x-www-form-urlencoded", body)
            .await
    }

    pub(crate) async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> (StatusCode, http::HeaderMap, Value) {
        let response = self
            .sts
            .clone()
            .oneshot(
                Request::post(path)
                    .header("content-type", content_type)
                    .body(Body::from(body.to_owned()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    pub(crate) async fn bootstrap(&self) -> Value {
        let (status, _, body) = self
            .exchange(&self.form(&[
                ("scope", "agent:lifecycle"),
                ("resource", "resource://ledger"),
            ]))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    pub(crate) async fn jwks(&self) -> Jwks {
        let (status, _, body) = call(
            &self.sts,
            "GET",
            &format!("/.well-known/jwks.json?zone_id={}", self.zone_id),
            None,
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body).unwrap()
    }

    /// Verifies `token` the way a third party does: with the published JWKS only.
    pub(crate) async fn verify(
        &self,
        token: &str,
    ) -> Result<MandateClaims, crate::mandate::MandateError> {
        let keys: Vec<(String, PublicKey)> = self
            .jwks()
            .await
            .keys
            .into_iter()
            .map(|jwk| {
                let x = URL_SAFE_NO_PAD.decode(&jwk.x).unwrap();
                let y = URL_SAFE_NO_PAD.decode(&jwk.y).unwrap();
                (jwk.kid, PublicKey::from_xy(&x, &y).unwrap())
            })
            .collect();
        crate::mandate::verify(token, |kid| {
            keys.iter().find(|(id, _)| id == kid).map(|(_, key)| key)
        })
    }

    pub(crate) fn session(&self, id: &str, labels: &[&str]) -> Session {
        let now = caracal_store::now_ms();
        Session {
            id: id.to_owned(),
            zone_id: self.zone_id.clone(),
            application_id: self.app_id.clone(),
            parent_id: None,
            authority_record_id: "ar".to_owned(),
            status: "active".to_owned(),
            lifecycle: "task".to_owned(),
            depth: 0,
            labels: labels.iter().map(|label| (*label).to_owned()).collect(),
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

    pub(crate) fn edge(
        &self,
        id: &str,
        from: &str,
        to: &str,
        parent: Option<&str>,
        constraints: Value,
    ) -> DelegationEdge {
        DelegationEdge {
            id: id.to_owned(),
            zone_id: self.zone_id.clone(),
            source_session_id: from.to_owned(),
            target_session_id: to.to_owned(),
            issuer_application_id: self.app_id.clone(),
            receiver_application_id: self.app_id.clone(),
            parent_edge_id: parent.map(str::to_owned),
            resource_id: None,
            scopes: vec!["ledger:read".to_owned(), "ledger:refund".to_owned()],
            constraints: constraints.to_string(),
            status: "active".to_owned(),
            expires_at_ms: Some(caracal_store::now_ms() + 600_000),
            created_at_ms: caracal_store::now_ms(),
            revoked_at_ms: None,
        }
    }

    /// Two live sessions of the application, `g-source` delegating to `g-target` along
    /// `g-edge`: what a gateway mandate is minted along.
    pub(crate) async fn gateway_delegation(&self) {
        let store = self.shared.store.as_ref();
        for id in ["g-source", "g-target"] {
            store
                .create_session(&self.session(id, &[&self.app_id]), &[])
                .await
                .unwrap();
        }
        store
            .create_delegation_edge(
                &self.edge("g-edge", "g-source", "g-target", None, json!({})),
                &[],
            )
            .await
            .unwrap();
    }

    pub(crate) fn delegated(&self, session: &str, edge: &str, scope: &str) -> String {
        self.form(&[
            ("scope", scope),
            ("resource", "resource://ledger"),
            ("agent_session_id", session),
            ("delegation_edge_id", edge),
        ])
    }
}

pub(crate) fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

pub(crate) async fn audit_events(shared: &Shared) -> Vec<Value> {
    // Evidence is flushed in batches: wait for it to reach the stream.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let entries = shared
        .bus
        .streams
        .range(caracal_bus::stream_names::AUDIT_EVENTS, None, 1000)
        .await
        .unwrap();
    entries
        .iter()
        .filter_map(|entry| serde_json::from_str(entry.fields.get("data")?).ok())
        .collect()
}

#[tokio::test]
async fn a_bootstrap_mint_is_a_session_mandate_verifiable_with_the_published_keys_alone() {
    let world = world().await;
    let body = world.bootstrap().await;
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert_eq!(body["scope"], "agent:lifecycle");
    assert_eq!(body["target_resources"], json!(["resource://ledger"]));
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(body.get("upstreams"), None, "never to public callers");
    let token = body["access_token"].as_str().unwrap();
    let claims = world.verify(token).await.unwrap();
    assert_eq!(claims.use_, "session");
    assert_eq!(claims.aud, [ISSUER]);
    assert_eq!(claims.iss, ISSUER);
    assert_eq!(claims.sid, claims.root_sid);
    assert_eq!(
        (claims.sub.as_str(), claims.client_id.as_str()),
        (world.app_id.as_str(), world.app_id.as_str())
    );
    assert_eq!(claims.exp - claims.iat, 900);
    // Exactly the claim set: optional claims absent, never empty.
    let raw = claims_of(token);
    let mut names: Vec<&str> = raw
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "aud",
            "client_id",
            "exp",
            "iat",
            "iss",
            "jti",
            "root_sid",
            "scope",
            "sid",
            "sub",
            "sub_type",
            "target",
            "use",
            "zone_id"
        ]
    );
    // The authority record exists, and the evidence says allow.
    let record = world
        .shared
        .store
        .get_authority_record(&world.zone_id, &claims.sid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.status, "active");
    assert!(record.claims.contains(&claims.jti));
    let events = audit_events(&world.shared).await;
    let exchange = events
        .iter()
        .find(|event| event["event_type"] == "token_exchange")
        .unwrap();
    assert_eq!(exchange["decision"], "allow");
    assert_eq!(
        exchange["determining_policies_json"][0]["policy"],
        "caracal-bootstrap"
    );

    // A bootstrap asking for more than agent:lifecycle is denied by the contract.
    let (status, _, denied) = world
        .exchange(&world.form(&[("scope", "ledger:read"), ("resource", "resource://ledger")]))
        .await;
    assert_eq!(
        (status, denied["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("access_denied"))
    );
    assert_eq!(
        denied["error_description"],
        "policy denied (no_rule_matched)"
    );
}

#[tokio::test]
async fn transport_and_client_errors_have_their_status_code_and_request_id() {
    let world = world().await;
    let good = world.form(&[
        ("scope", "agent:lifecycle"),
        ("resource", "resource://ledger"),
    ]);
    let cases: Vec<(String, &str, StatusCode, &str)> = vec![
        (
            good.clone(),
            "application/json",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_token",
        ),
        (
            format!("{good}&scope=again"),
            "application/x-www-form-urlencoded",
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
        (
            format!("{good}&actor_token=x"),
            "application/x-www-form-urlencoded",
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
        (
            format!("{good}&client_assertion=x"),
            "application/x-www-form-urlencoded",
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
        (
            good.replace("token-exchange", "client_credentials"),
            "application/x-www-form-urlencoded",
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
        (
            format!("{good}&ttl_seconds=ten"),
            "application/x-www-form-urlencoded",
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
        (
            format!("{good}&ttl_seconds=-1"),
            "application/x-www-form-urlencoded",
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
        (
            format!("{good}&ttl_seconds=3601"),
            "application/x-www-form-urlencoded",
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
        (
            format!("{good}&resource=+"),
            "application/x-www-form-urlencoded",
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
        (
            world.form(&[("scope", "agent:lifecycle")]),
            "application/x-www-form-urlencoded",
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
        (
            format!("{good}&subject_token=x"),
            "application/x-www-form-urlencoded",
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
        (
            format!("{good}&scope=%ZZ"),
            "application/x-www-form-urlencoded",
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
        (
            format!("{good}&x=%FF"),
            "application/x-www-form-urlencoded",
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
        (
            "a=".to_owned() + &"b".repeat(super::MAX_FORM_BYTES),
            "application/x-www-form-urlencoded",
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            good.replace(&world.secret, &"x".repeat(40)),
            "application/x-www-form-urlencoded",
            StatusCode::UNAUTHORIZED,
            "access_denied",
        ),
        (
            good.replace(&world.app_id, "nobody"),
            "application/x-www-form-urlencoded",
            StatusCode::UNAUTHORIZED,
            "access_denied",
        ),
    ];
    for (body, content_type, status, code) in cases {
        let (got, headers, answer) = world.post("/oauth/2/token", content_type, &body).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(code)),
            "{}",
            &body[..body.len().min(200)]
        );
        assert_eq!(
            answer["requestId"].as_str(),
            headers.get("x-request-id").and_then(|v| v.to_str().ok()),
            "the body names the request id"
        );
        assert!(!answer["error_description"].as_str().unwrap().is_empty());
    }
    let (got, _, answer) = world
        .post(
            "/oauth/2/token?zone_id=x",
            "application/x-www-form-urlencoded",
            &good,
        )
        .await;
    assert_eq!(
        (got, answer["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_token"))
    );
    let (got, _, answer) = call(&world.sts, "GET", "/.well-known/jwks.json", None, "").await;
    assert_eq!(
        (got, answer["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_token"))
    );
    let (got, _, answer) = call(
        &world.sts,
        "GET",
        "/.well-known/jwks.json?zone_id=nope",
        None,
        "",
    )
    .await;
    assert_eq!(
        (got, answer["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("resource_not_found"))
    );

    // More than 60 failures in a minute lock the application out, good secret or not.
    let wrong = good.replace(&world.secret, &"y".repeat(40));
    for _ in 0..61 {
        world.exchange(&wrong).await;
    }
    let (got, headers, answer) = world.exchange(&good).await;
    assert_eq!(
        (got, answer["error"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    assert!(headers.contains_key("retry-after"));
}

#[tokio::test]
async fn a_delegated_mint_carries_the_live_lineage_and_every_narrowing_is_enforced() {
    let world = world().await;
    let store = world.shared.store.as_ref();
    let app = world.app_id.clone();
    for id in ["s-root", "s-mid", "s-leaf"] {
        store
            .create_session(&world.session(id, &[&app]), &[])
            .await
            .unwrap();
    }
    // root → mid (budget 2), mid → leaf (budget 1): a two-hop chain.
    store
        .create_delegation_edge(
            &world.edge("e-1", "s-root", "s-mid", None, json!({"max_hops": 2})),
            &[],
        )
        .await
        .unwrap();
    store
        .create_delegation_edge(
            &world.edge(
                "e-2",
                "s-mid",
                "s-leaf",
                Some("e-1"),
                json!({"max_hops": 1, "ttl_seconds": 300}),
            ),
            &[],
        )
        .await
        .unwrap();
    let (status, _, body) = world
        .exchange(&world.delegated("s-leaf", "e-2", "ledger:read"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["expires_in"], 300, "clamped to the edge's ttl_seconds");
    let claims = world
        .verify(body["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(claims.use_, "gateway");
    assert_eq!(claims.scope.as_deref(), Some("ledger:read"));
    assert_eq!(claims.delegation_edge_id.as_deref(), Some("e-2"));
    assert_eq!(
        claims.delegation_path,
        Some(vec!["e-1".to_owned(), "e-2".to_owned()])
    );
    assert_eq!(claims.hop_count, Some(2));
    assert_eq!(claims.delegation_graph_epoch, Some(2));
    let chain = claims.delegation_chain.unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[2].agent_session_id.as_deref(), Some("s-leaf"));
    assert_eq!(chain[2].delegation_edge_id, None);

    // Each narrowing refuses with 403 access_denied and a reason.
    let refused = |body: String, needle: &'static str| {
        let world = &world;
        async move {
            let (status, _, answer) = world.exchange(&body).await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (StatusCode::FORBIDDEN, Some("access_denied")),
                "{answer}"
            );
            let description = answer["error_description"].as_str().unwrap().to_owned();
            assert!(
                description.contains(needle),
                "{description} should mention {needle}"
            );
        }
    };
    refused(
        world.delegated("s-leaf", "e-2", "ledger:delete"),
        "delegation_scope_exceeded",
    )
    .await;
    refused(
        world.delegated("s-leaf", "e-2", "agent:lifecycle"),
        "agent:lifecycle",
    )
    .await;
    refused(
        world.delegated("s-mid", "e-2", "ledger:read"),
        "does not target",
    )
    .await;
    refused(
        format!(
            "{}&ttl_seconds=600",
            world.delegated("s-leaf", "e-2", "ledger:read")
        ),
        "ttl_seconds",
    )
    .await;
    // A budget that does not cover the chain below it (the parent allows only itself).
    store
        .create_delegation_edge(
            &world.edge("e-3", "s-root", "s-mid", None, json!({"max_hops": 1})),
            &[],
        )
        .await
        .unwrap();
    store
        .create_delegation_edge(
            &world.edge("e-4", "s-mid", "s-leaf", Some("e-3"), json!({})),
            &[],
        )
        .await
        .unwrap();
    refused(
        world.delegated("s-leaf", "e-4", "ledger:read"),
        "hop budget",
    )
    .await;
    // Unknown constraint keys are refused, not ignored.
    store
        .create_delegation_edge(
            &world.edge("e-5", "s-mid", "s-leaf", None, json!({"budget": 3})),
            &[],
        )
        .await
        .unwrap();
    refused(
        world.delegated("s-leaf", "e-5", "ledger:read"),
        "constraints invalid",
    )
    .await;
    // An edge limited to another resource.
    store
        .create_delegation_edge(
            &world.edge(
                "e-6",
                "s-mid",
                "s-leaf",
                None,
                json!({"resources": ["resource://other"]}),
            ),
            &[],
        )
        .await
        .unwrap();
    refused(
        world.delegated("s-leaf", "e-6", "ledger:read"),
        "outside the delegation",
    )
    .await;
    // A session without the role label: the policy refuses.
    store
        .create_session(&world.session("s-nolabel", &["intern"]), &[])
        .await
        .unwrap();
    store
        .create_delegation_edge(
            &world.edge("e-7", "s-mid", "s-nolabel", None, json!({})),
            &[],
        )
        .await
        .unwrap();
    refused(
        world.delegated("s-nolabel", "e-7", "ledger:read"),
        "role_scope_mismatch",
    )
    .await;
    // Revoking the parent edge, or ending a session, stops the chain at once.
    store
        .revoke_delegation_edges(&world.zone_id, &["e-1".to_owned()], &[])
        .await
        .unwrap();
    refused(
        world.delegated("s-leaf", "e-2", "ledger:read"),
        "not active",
    )
    .await;
    store
        .set_session_status(&world.zone_id, "s-nolabel", "terminated", Some("done"), &[])
        .await
        .unwrap();
    refused(
        world.delegated("s-nolabel", "e-7", "ledger:read"),
        "agent session not active",
    )
    .await;
}

#[tokio::test]
async fn every_failure_fails_closed_with_its_code() {
    let world = world().await;
    let session = world.bootstrap().await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();

    // A valid session mandate as a subject token on a direct call: only via the Gateway.
    let subject = |token: &str| {
        world.form(&[
            ("resource", "resource://ledger"),
            ("subject_token", token),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
        ])
    };
    let (status, _, answer) = world.exchange(&subject(&session)).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("access_denied"))
    );
    // Forged, foreign-zone, wrong-use and expired subject tokens: 401 invalid_token.
    let keys = world
        .shared
        .store
        .list_signing_keys(&world.zone_id)
        .await
        .unwrap();
    let signer = caracal_crypto::es256::SigningKey::from_pkcs8(
        &world
            .shared
            .kek
            .open(
                &format!("zone-signing-key:{}", world.zone_id),
                &keys[0].private_envelope,
            )
            .unwrap(),
    )
    .unwrap();
    let header = crate::mandate::encoded_header(&keys[0].kid);
    let base: MandateClaims = serde_json::from_value(claims_of(&session)).unwrap();
    let sign = |edit: &dyn Fn(&mut MandateClaims)| {
        let mut claims = base.clone();
        edit(&mut claims);
        crate::mandate::sign(&header, &signer, &claims).unwrap()
    };
    let now = caracal_store::now_ms() / 1000;
    for (token, needle) in [
        (sign(&|c| c.zone_id = "other".into()), "another zone"),
        (sign(&|c| c.use_ = "gateway".into()), "use=session"),
        (sign(&|c| c.exp = now - 120), "expired"),
        (sign(&|c| c.iss = "http://evil".into()), "not issued"),
        (
            sign(&|c| c.sid = "no-such-record".into()),
            "no longer active",
        ),
        (format!("{}AAAA", &session[..session.len() - 4]), "rejected"),
        ("not.a.jwt".to_owned(), "rejected"),
    ] {
        let (status, _, answer) = world.exchange(&subject(&token)).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_token")),
            "{needle}: {answer}"
        );
        assert!(
            answer["error_description"]
                .as_str()
                .unwrap()
                .contains(needle),
            "{needle}: {answer}"
        );
    }

    // No active policy set: deny all, named.
    let w = Some(world.writer.as_str());
    let (_, _, other) = call(&world.api, "POST", "/v1/zones", w, r#"{"name":"bare"}"#).await;
    let bare = world
        .form(&[
            ("scope", "agent:lifecycle"),
            ("resource", "resource://ledger"),
        ])
        .replace(&world.zone_id, other["id"].as_str().unwrap());
    let (status, _, answer) = world.exchange(&bare).await;
    // The secret proves the application, which lives in another zone: say so.
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("zone_invalid")),
        "{answer}"
    );
    assert!(
        answer["error_description"]
            .as_str()
            .unwrap()
            .contains(&world.zone_id)
    );
    // A wrong secret never learns where the application lives.
    let (status, _, answer) = world
        .exchange(&bare.replace(&world.secret, &"z".repeat(40)))
        .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("access_denied"))
    );

    // The store goes away: 503 sts_unavailable, nothing minted.
    world.store.down.store(true, Ordering::SeqCst);
    let (status, headers, answer) = world
        .exchange(&world.form(&[
            ("scope", "agent:lifecycle"),
            ("resource", "resource://ledger"),
        ]))
        .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("sts_unavailable"))
    );
    assert!(headers.contains_key("retry-after"));
    world.store.down.store(false, Ordering::SeqCst);
    world.bootstrap().await;
}

#[tokio::test]
async fn without_a_bundle_or_evidence_nothing_is_minted() {
    let world = world().await;
    // An STS that has loaded no bundle for the zone: no_active_policy_set.
    let mut bare_state = RoleState::new(Role::Sts, world.shared.clone());
    bare_state.sts = Some(Arc::new(Sts::start(
        ISSUER.to_owned(),
        crate::policy::PolicyCache::default(),
        world.shared.store.clone(),
        &world.shared.kek,
    )));
    let bare = router(bare_state);
    let body = world.form(&[
        ("scope", "agent:lifecycle"),
        ("resource", "resource://ledger"),
    ]);
    let response = bare
        .oneshot(
            Request::post("/oauth/2/token")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let answer: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(
        answer["error_description"],
        "policy denied (no_active_policy_set)"
    );

    // Evidence cannot be recorded (bus down, nowhere to spill): refused, nothing minted.
    let directory = tempfile::tempdir().unwrap();
    let replay_dir = directory.path().join("replay");
    let (evidence, _tasks) = Evidence::start(
        caracal_bus::Producer::new(
            Arc::new(crate::test_support::DownBus),
            caracal_bus::signature::StreamKey::new(b"k"),
        ),
        EvidenceConfig::new(replay_dir.clone()),
    )
    .unwrap();
    // Nowhere to spill: the replay directory is replaced by a file.
    std::fs::remove_dir_all(&replay_dir).unwrap();
    std::fs::write(&replay_dir, "blocked").unwrap();
    let shared = Shared::new(
        world.shared.store.clone(),
        world.shared.bus.clone(),
        evidence,
        replay_dir,
        world.shared.kek.clone(),
    );
    let mut state = RoleState::new(Role::Sts, shared);
    let sts = Arc::new(Sts::start(
        ISSUER.to_owned(),
        crate::policy::PolicyCache::default(),
        world.shared.store.clone(),
        &world.shared.kek,
    ));
    sts.policies
        .refresh_all(world.shared.store.as_ref(), "sts-test")
        .await
        .unwrap();
    state.sts = Some(sts);
    let lost = router(state);
    let before = world
        .shared
        .store
        .list_authority_records_of(&world.zone_id, &world.app_id)
        .await
        .unwrap()
        .len();
    let response = lost
        .oneshot(
            Request::post("/oauth/2/token")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Body::from(world.form(&[
                    ("scope", "agent:lifecycle"),
                    ("resource", "resource://ledger"),
                ])))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let answer: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(answer.get("access_token").is_none());
    assert!(
        matches!(
            answer["error"].as_str(),
            Some("audit_evidence_lost" | "audit_overloaded")
        ),
        "{answer}"
    );
    let after = world
        .shared
        .store
        .list_authority_records_of(&world.zone_id, &world.app_id)
        .await
        .unwrap()
        .len();
    assert!(
        after <= before + 1,
        "a record may be written, but no mandate leaves"
    );
}

#[tokio::test]
async fn rotation_signs_with_the_new_key_at_once_and_the_old_one_verifies_through_the_overlap() {
    let world = world().await;
    let before = world.bootstrap().await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let old_kid = world.jwks().await.keys[0].kid.clone();
    let w = Some(world.writer.as_str());
    let rotate = format!("/v1/zones/{}/signing-keys/rotate", world.zone_id);
    let (status, _, rotated) = call(&world.api, "POST", &rotate, w, "").await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert_eq!(rotated["rotated"], true);
    let new_kid = rotated["kid"].as_str().unwrap().to_owned();
    // Replicas learn through `caracal.keys.invalidate` (in the rotation's outbox); the test
    // flushes by hand.
    world.core.keys.flush(&world.zone_id);
    let kids: Vec<String> = world
        .jwks()
        .await
        .keys
        .into_iter()
        .map(|key| key.kid)
        .collect();
    assert_eq!(kids, [new_kid.clone(), old_kid.clone()]);
    let after = world.bootstrap().await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(after.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["kid"], new_kid.as_str());
    assert_eq!(header["alg"], "ES256");
    assert!(
        world.verify(&before).await.is_ok(),
        "the old key verifies in the overlap"
    );
    assert!(world.verify(&after).await.is_ok());

    // A second rotation with no overlap: only the newest key is left; the first is gone too.
    let (status, _, _) = call(&world.api, "POST", &rotate, w, r#"{"overlap_seconds":0}"#).await;
    assert_eq!(status, StatusCode::OK);
    world.core.keys.flush(&world.zone_id);
    let jwks = world.jwks().await;
    assert_eq!(jwks.keys.len(), 1);
    assert_eq!(
        world.verify(&before).await,
        Err(crate::mandate::MandateError::UnknownKey)
    );
    let (status, _, _) = call(
        &world.api,
        "POST",
        &rotate,
        w,
        r#"{"overlap_seconds":999999999}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, _, listed) = call(
        &world.api,
        "GET",
        &format!("/v1/zones/{}/signing-keys", world.zone_id),
        w,
        "",
    )
    .await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 3);
    let outbox = world
        .shared
        .store
        .claim_outbox("test", 100, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    assert!(outbox.iter().any(
        |row| row.stream == "caracal.keys.invalidate" && row.fields["zone_id"] == world.zone_id
    ));
    assert!(
        outbox.iter().any(|row| row
            .fields
            .get("data")
            .is_some_and(|data| data.contains("admin.signing_key.rotate"))),
        "rotation is audited"
    );
}

/// A gateway call as the Gateway signs it.
fn gateway_request(
    world: &World,
    body: &str,
    timestamp: i64,
    nonce: &str,
    request_id: &str,
) -> Request<Body> {
    let key = world.shared.kek.derive(super::gateway::KEY_LABEL);
    let signature = super::gateway::signature(
        &key,
        &timestamp.to_string(),
        nonce,
        "POST",
        "/oauth/2/token",
        body.as_bytes(),
    );
    Request::post("/oauth/2/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-request-id", request_id)
        .header(super::gateway::TIMESTAMP_HEADER, timestamp.to_string())
        .header(super::gateway::NONCE_HEADER, nonce)
        .header(super::gateway::SIGNATURE_HEADER, signature)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

async fn send(world: &World, request: Request<Body>) -> (StatusCode, Value) {
    let response = world.sts.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_gateway_re_exchange_is_signed_fresh_once_only_and_inside_the_operations() {
    let world = world().await;
    world.gateway_delegation().await;
    let store = world.shared.store.as_ref();
    let mint = || async {
        let (status, _, body) = world
            .exchange(&world.delegated("g-target", "g-edge", "ledger:read"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    };
    let now = caracal_store::now_ms() / 1000;
    let form = |token: &str, request_id: &str, method: &str, path: &str| {
        serde_urlencoded::to_string([
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("zone_id", world.zone_id.as_str()),
            ("resource", "resource://ledger"),
            ("subject_token", token),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("gateway_request_id", request_id),
            ("request_method", method),
            ("request_path", path),
        ])
        .unwrap()
    };

    let gateway_mandate = mint().await;
    let body = form(&gateway_mandate, "req-1", "GET", "/entries");
    let (status, answer) = send(
        &world,
        gateway_request(&world, &body, now, "nonce-1", "req-1"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let resource_mandate = answer["access_token"].as_str().unwrap();
    let claims = world.verify(resource_mandate).await.unwrap();
    let presented: MandateClaims = serde_json::from_value(claims_of(&gateway_mandate)).unwrap();
    assert_eq!(claims.use_, "resource");
    assert_eq!(claims.aud, ["resource://ledger"]);
    assert_eq!(claims.scope.as_deref(), Some("ledger:read"), "inherited");
    assert_eq!(claims.root_sid, presented.root_sid);
    assert_ne!(claims.sid, presented.sid);
    assert_eq!(claims.delegation_edge_id.as_deref(), Some("g-edge"));
    let record = store
        .get_authority_record(&world.zone_id, &claims.sid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.parent_id.as_deref(), Some(presented.sid.as_str()));
    assert_eq!(
        answer["upstreams"]["resource://ledger"]["auth_mode"],
        "none"
    );
    assert_eq!(
        answer["upstreams"]["resource://ledger"]["url"],
        "http://127.0.0.1:9/api"
    );

    // The same gateway mandate again (a new nonce): spent.
    let body = form(&gateway_mandate, "req-2", "GET", "/entries");
    let (status, answer) = send(
        &world,
        gateway_request(&world, &body, now, "nonce-2", "req-2"),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_token")),
        "{answer}"
    );
    assert!(
        answer["error_description"]
            .as_str()
            .unwrap()
            .contains("replay")
    );

    // A replayed nonce, a stale or future timestamp, a wrong signature, a request id that is
    // not the call's: 401 access_denied, before the mandate is looked at (so it stays unspent).
    let fresh = mint().await;
    let body = form(&fresh, "req-3", "GET", "/entries");
    for (request, why) in [
        (
            gateway_request(&world, &body, now, "nonce-1", "req-3"),
            "replayed nonce",
        ),
        (
            gateway_request(&world, &body, now - 90, "nonce-3", "req-3"),
            "clock skew",
        ),
        (
            gateway_request(&world, &body, now + 90, "nonce-4", "req-3"),
            "clock skew",
        ),
        (
            gateway_request(&world, &body, now, "nonce-5", "req-other"),
            "gateway_request_id",
        ),
        (
            {
                let mut request = gateway_request(&world, &body, now, "nonce-6", "req-3");
                request.headers_mut().insert(
                    super::gateway::SIGNATURE_HEADER,
                    "00".repeat(32).parse().unwrap(),
                );
                request
            },
            "signature",
        ),
    ] {
        let (status, answer) = send(&world, request).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("access_denied")),
            "{why}: {answer}"
        );
        assert!(
            answer["error_description"].as_str().unwrap().contains(why),
            "{why}: {answer}"
        );
    }
    // An operation the mandate's scope does not cover: 403 operation_not_permitted.
    let body = form(&fresh, "req-7", "POST", "/refunds");
    let (status, answer) = send(
        &world,
        gateway_request(&world, &body, now, "nonce-7", "req-7"),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("operation_not_permitted")),
        "{answer}"
    );
    // A session mandate is not a gateway mandate.
    let session = world.bootstrap().await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let body = form(&session, "req-8", "GET", "/entries");
    let (status, answer) = send(
        &world,
        gateway_request(&world, &body, now, "nonce-8", "req-8"),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_token")),
        "{answer}"
    );
    // The replay registry is down: nothing can prove the nonce is new, so 503.
    let shared = Shared::new(
        world.shared.store.clone(),
        Bus {
            replay: Arc::new(crate::test_support::DownBus),
            ..world.shared.bus.clone()
        },
        world.shared.evidence.clone(),
        world.shared.replay_dir.clone(),
        world.shared.kek.clone(),
    );
    let mut state = RoleState::new(Role::Sts, shared);
    state.sts = Some(Arc::clone(&world.core));
    let cut_off = router(state);
    let fresh = mint().await;
    let body = form(&fresh, "req-9", "GET", "/entries");
    let response = cut_off
        .oneshot(gateway_request(&world, &body, now, "nonce-9", "req-9"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Upstream directives never reach a public caller: a direct exchange has none.
    let (_, _, direct) = world
        .exchange(&world.delegated("g-target", "g-edge", "ledger:read"))
        .await;
    assert_eq!(direct.get("upstreams"), None);
}

#[tokio::test]
async fn over_the_mint_limit_the_answer_is_429_with_retry_after() {
    let world = world().await;
    let mut state = RoleState::new(Role::Sts, world.shared.clone());
    let sts = Sts::start(
        ISSUER.to_owned(),
        world.core.policies.clone(),
        world.shared.store.clone(),
        &world.shared.kek,
    )
    .with_mint_limit(2);
    state.sts = Some(Arc::new(sts));
    let limited = router(state);
    let body = world.form(&[
        ("scope", "agent:lifecycle"),
        ("resource", "resource://ledger"),
    ]);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = limited
            .clone()
            .oneshot(
                Request::post("/oauth/2/token")
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Body::from(body.clone()))
                    .unwrap(),
            )
            .await
            .unwrap();
        statuses.push((
            response.status(),
            response.headers().get("retry-after").is_some(),
        ));
    }
    // Windows are aligned to the minute: a boundary between the calls resets the count.
    assert!(
        statuses
            == [
                (StatusCode::OK, false),
                (StatusCode::OK, false),
                (StatusCode::TOO_MANY_REQUESTS, true)
            ]
            || statuses
                .iter()
                .filter(|(status, _)| *status == StatusCode::OK)
                .count()
                == 3,
        "{statuses:?}"
    );
}

#[tokio::test]
async fn a_gated_scope_waits_for_a_human_and_the_approval_is_spent_once() {
    let world = world().await;
    let app = world.app_id.clone();
    world
        .activate(&format!(
            "{}risk := [{{\"scope\": \"ledger:refund\", \"tier\": \"high\"}}]\napproval_tiers := [{{\"tier\": \"high\", \"approver\": \"operator\", \"ttl_seconds\": 600}}]\n",
            document(&app)
        ))
        .await;
    world
        .core
        .policies
        .refresh_all(world.shared.store.as_ref(), "sts-test")
        .await
        .unwrap();
    let store = world.shared.store.as_ref();
    for id in ["a-source", "a-target", "b-target"] {
        store
            .create_session(&world.session(id, &[&app]), &[])
            .await
            .unwrap();
    }
    store
        .create_delegation_edge(
            &world.edge("a-edge", "a-source", "a-target", None, json!({})),
            &[],
        )
        .await
        .unwrap();
    store
        .create_delegation_edge(
            &world.edge("b-edge", "a-source", "b-target", None, json!({})),
            &[],
        )
        .await
        .unwrap();
    let refund = world.delegated("a-target", "a-edge", "ledger:refund");

    // The gate: 401 interaction_required with the hold, the same hold on a retry.
    let (status, headers, held) = world.exchange(&refund).await;
    assert_eq!(
        (status, held["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("interaction_required")),
        "{held}"
    );
    assert_eq!(
        headers["www-authenticate"],
        "Bearer error=\"interaction_required\""
    );
    assert_eq!(held["approval_type"], "human_approval");
    assert_eq!(held["state"], "pending");
    assert_eq!(held["tier"], "high");
    assert_eq!(held["binding"].as_str().unwrap().len(), 64);
    assert!(held["approval_expires_at"].as_str().unwrap().ends_with('Z'));
    let hold_id = held["approval_id"].as_str().unwrap().to_owned();
    let (_, _, again) = world.exchange(&refund).await;
    assert_eq!(again["approval_id"], hold_id.as_str());
    let with_approval = format!("{refund}&approval_id={hold_id}");
    let (status, _, pending) = world.exchange(&with_approval).await;
    assert_eq!(
        (status, pending["state"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("pending"))
    );
    // Ungated scopes are not held.
    let (status, _, _) = world
        .exchange(&world.delegated("a-target", "a-edge", "ledger:read"))
        .await;
    assert_eq!(status, StatusCode::OK);

    // Polling: the capability id alone; malformed or unknown ids are 404.
    let sts = world.sts.clone();
    let poll = |id: String| {
        let sts = sts.clone();
        async move { call(&sts, "GET", &format!("/approvals/{id}?wait=0"), None, "").await }
    };
    let (status, _, polled) = poll(hold_id.clone()).await;
    assert_eq!(
        (status, polled["state"].as_str()),
        (StatusCode::OK, Some("pending"))
    );
    assert_eq!(poll("not-a-uuid".into()).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        poll("4a4b5e7c-1d2e-4f00-8a00-000000000000".into()).await.0,
        StatusCode::NOT_FOUND
    );

    // An application session is not a subject: the decision endpoint refuses it.
    let session = world.bootstrap().await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = world
        .sts
        .clone()
        .oneshot(
            Request::post(format!("/approvals/{hold_id}/decision"))
                .header("authorization", format!("Bearer {session}"))
                .header("content-type", "application/json")
                .body(Body::from(
                    json!({"decision": "approved", "binding": held["binding"]}).to_string(),
                ))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    // An operator approves through the admin API; the retry mints, once.
    let approver = token(&world.shared, "approve", TokenScope::Global).await;
    let (status, _, decided) = call(
        &world.api,
        "POST",
        &format!("/v1/zones/{}/approvals/{hold_id}/approve", world.zone_id),
        Some(&approver),
        r#"{"reason":"refund checked"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{decided}");
    assert_eq!(poll(hold_id.clone()).await.2["state"], "approved");
    let (status, _, minted) = world.exchange(&with_approval).await;
    assert_eq!(status, StatusCode::OK, "{minted}");
    let first: MandateClaims =
        serde_json::from_value(claims_of(minted["access_token"].as_str().unwrap())).unwrap();
    assert_eq!(first.scope.as_deref(), Some("ledger:refund"));
    assert_eq!(poll(hold_id.clone()).await.2["state"], "consumed");
    // Within two minutes the same request is answered for the same record, not decided again.
    let (status, _, reissued) = world.exchange(&with_approval).await;
    assert_eq!(status, StatusCode::OK, "{reissued}");
    let second: MandateClaims =
        serde_json::from_value(claims_of(reissued["access_token"].as_str().unwrap())).unwrap();
    assert_eq!(second.sid, first.sid);
    assert_ne!(second.jti, first.jti);
    // The approval is bound to its request: another session cannot use it.
    let (status, _, mismatch) = world
        .exchange(&format!(
            "{}&approval_id={hold_id}",
            world.delegated("b-target", "b-edge", "ledger:refund")
        ))
        .await;
    assert_eq!(
        (status, mismatch["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("access_denied")),
        "{mismatch}"
    );
    assert!(
        mismatch["error_description"]
            .as_str()
            .unwrap()
            .contains("binding")
    );

    // A rejected hold refuses with 403.
    let other = world.delegated("b-target", "b-edge", "ledger:refund");
    let (_, _, held) = world.exchange(&other).await;
    let other_id = held["approval_id"].as_str().unwrap().to_owned();
    assert_ne!(other_id, hold_id);
    // A long poll returns as soon as the decision lands, not at the end of its wait.
    let started = std::time::Instant::now();
    let reject_path = format!("/v1/zones/{}/approvals/{other_id}/reject", world.zone_id);
    let poll_path = format!("/approvals/{other_id}?wait=20");
    let ((_, _, polled), (status, _, _)) =
        tokio::join!(call(&world.sts, "GET", &poll_path, None, ""), async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            call(
                &world.api,
                "POST",
                &reject_path,
                Some(&approver),
                r#"{"reason":"no"}"#,
            )
            .await
        });
    assert_eq!(status, StatusCode::OK);
    assert_eq!(polled["state"], "rejected");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let (status, _, rejected) = world
        .exchange(&format!("{other}&approval_id={other_id}"))
        .await;
    assert_eq!(
        (status, rejected["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("access_denied")),
        "{rejected}"
    );

    // The ledger tells the story per hold: held (deny), then spent (allow), then answered
    // again for the same record (allow); the rejected hold's requests stay denies.
    let story = |id: &str, events: &[Value]| -> Vec<String> {
        events
            .iter()
            .filter(|event| event["event_type"] == "token_exchange")
            .filter(|event| event["metadata_json"]["approval_id"] == id)
            .map(|event| {
                format!(
                    "{} {}",
                    event["decision"].as_str().unwrap(),
                    event["metadata_json"]["approval_outcome"].as_str().unwrap()
                )
            })
            .collect()
    };
    let events = audit_events(&world.shared).await;
    let spent = story(&hold_id, &events);
    assert_eq!(
        spent
            .iter()
            .filter(|line| line.ends_with("consumed"))
            .collect::<Vec<_>>(),
        ["allow consumed"],
        "{spent:?}"
    );
    assert_eq!(
        spent
            .iter()
            .filter(|line| line.ends_with("reissued"))
            .collect::<Vec<_>>(),
        ["allow reissued"],
        "{spent:?}"
    );
    assert!(
        spent
            .iter()
            .take(2)
            .all(|line| line == "deny interaction_required"),
        "{spent:?}"
    );
    let refused = story(&other_id, &events);
    assert!(
        refused.first().map(String::as_str) == Some("deny interaction_required")
            && refused.last().map(String::as_str) == Some("deny access_denied"),
        "{refused:?}"
    );
    // Each hold's own steps ride the transactions that take them (through the outbox):
    // issued once, decided once, consumed once, on the record the mint created.
    let steps: Vec<Value> = world
        .shared
        .store
        .claim_outbox("test", 1000, std::time::Duration::from_secs(60))
        .await
        .unwrap()
        .iter()
        .filter(|row| row.stream == caracal_bus::stream_names::AUDIT_EVENTS)
        .filter_map(|row| serde_json::from_str::<Value>(&row.fields["data"]).ok())
        .filter(|event| {
            event["event_type"]
                .as_str()
                .unwrap()
                .starts_with("step_up_")
        })
        .collect();
    let steps_of = |id: &str| -> Vec<String> {
        steps
            .iter()
            .filter(|event| event["metadata_json"]["challenge_id"] == id)
            .map(|event| {
                format!(
                    "{} {}",
                    event["event_type"].as_str().unwrap(),
                    event["decision"].as_str().unwrap()
                )
            })
            .collect()
    };
    assert_eq!(
        steps_of(&hold_id),
        [
            "step_up_issued allow",
            "step_up_decided allow",
            "step_up_consumed allow"
        ]
    );
    assert_eq!(
        steps_of(&other_id),
        ["step_up_issued allow", "step_up_decided deny"]
    );
    let consumed = steps
        .iter()
        .find(|event| event["event_type"] == "step_up_consumed")
        .unwrap();
    assert_eq!(
        consumed["metadata_json"]["authority_record_id"],
        first.sid.as_str()
    );
    assert_eq!(consumed["metadata_json"]["tier"], "high");
    assert_eq!(consumed["metadata_json"]["approver_class"], "operator");
}

#[tokio::test]
async fn a_control_key_mints_only_the_control_audience_within_its_traits() {
    let world = world().await;
    let w = Some(world.writer.as_str());
    let create = |name: &str, traits: Value| {
        let body =
            json!({"name": name, "registration_method": "managed", "traits": traits}).to_string();
        let path = format!("/v1/zones/{}/applications", world.zone_id);
        let api = world.api.clone();
        async move {
            let (status, _, app) = call(&api, "POST", &path, w, &body).await;
            assert_eq!(status, StatusCode::CREATED, "{app}");
            (
                app["id"].as_str().unwrap().to_owned(),
                app["client_secret"].as_str().unwrap().to_owned(),
            )
        }
    };
    let (control_id, control_secret) = create(
        "operator-key",
        json!([
            "control:invoke",
            "control:scope:control:sessions.read",
            "control:max-ttl:120"
        ]),
    )
    .await;
    let (expired_id, expired_secret) = create(
        "old-key",
        json!([
            "control:invoke",
            "control:scope:control:sessions.read",
            "control:expires:2020-01-01T00:00:00Z"
        ]),
    )
    .await;
    let form = |id: &str, secret: &str, extra: &[(&str, &str)]| {
        let mut fields = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("application_id", id),
            ("client_secret", secret),
            ("resource", "caracal-control"),
        ];
        fields.extend_from_slice(extra);
        serde_urlencoded::to_string(fields).unwrap()
    };
    // No zone_id: the key's zone is its application's.
    let (status, _, body) = world
        .exchange(&form(
            &control_id,
            &control_secret,
            &[("scope", "control:sessions.read")],
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["expires_in"], 120, "capped by control:max-ttl");
    let claims = world
        .verify(body["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(
        (claims.use_.as_str(), claims.aud.clone()),
        ("resource", vec!["caracal-control".to_owned()])
    );
    assert_eq!(claims.zone_id, world.zone_id);
    for (body, needle) in [
        (
            form(
                &control_id,
                &control_secret,
                &[("scope", "control:sessions.kill")],
            ),
            "scope not granted",
        ),
        (
            form(
                &control_id,
                &control_secret,
                &[("scope", "control:sessions.read"), ("ttl_seconds", "300")],
            ),
            "max-ttl",
        ),
        (
            form(
                &control_id,
                &control_secret,
                &[
                    ("scope", "control:sessions.read"),
                    ("resource", "resource://ledger"),
                    ("zone_id", &world.zone_id),
                ],
            ),
            "alone",
        ),
        (
            form(
                &expired_id,
                &expired_secret,
                &[("scope", "control:sessions.read")],
            ),
            "expired",
        ),
        (
            form(
                &world.app_id,
                &world.secret,
                &[("scope", "control:sessions.read")],
            ),
            "control key",
        ),
    ] {
        let (status, _, answer) = world.exchange(&body).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (StatusCode::FORBIDDEN, Some("access_denied")),
            "{needle}: {answer}"
        );
        assert!(
            answer["error_description"]
                .as_str()
                .unwrap()
                .contains(needle),
            "{needle}: {answer}"
        );
    }
}

/// The admin API's read views over what the STS and the Coordinator wrote: authority records
/// and sessions filtered and paged, each session with its subject; bad filters refused.
#[tokio::test]
async fn the_read_views_filter_and_page_records_and_sessions_with_their_subject() {
    let world = world().await;
    let store = world.shared.store.as_ref();
    let mut records = Vec::new();
    for _ in 0..3 {
        let minted = world.bootstrap().await;
        records.push(claims_of(minted["access_token"].as_str().unwrap())["sid"].clone());
    }
    let record = records[0].as_str().unwrap().to_owned();
    for (id, labels, status) in [
        ("s-a", vec!["alpha"], "active"),
        ("s-b", vec!["beta"], "active"),
        ("s-c", vec!["alpha", "gamma"], "suspended"),
    ] {
        let mut session = world.session(id, &labels);
        session.authority_record_id = record.clone();
        session.status = status.to_owned();
        store.create_session(&session, &[]).await.unwrap();
    }
    let w = Some(world.writer.as_str());
    let get = |path: String| {
        let api = world.api.clone();
        async move {
            let (status, _, body) = call(&api, "GET", &path, w, "").await;
            (status, body)
        }
    };
    let base = format!("/v1/zones/{}", world.zone_id);

    let (status, all) = get(format!("{base}/authority-records?kind=application")).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(all["items"].as_array().unwrap().len(), 3);
    assert_eq!(all["items"][0]["subject_id"], world.app_id.as_str());
    assert_eq!(all["items"][0]["status"], "active");
    let (_, page) = get(format!("{base}/authority-records?limit=2")).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, rest) = get(format!("{base}/authority-records?limit=2&cursor={cursor}")).await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_eq!(rest["next_cursor"], Value::Null);
    let (_, one) = get(format!(
        "{base}/authority-records?authority_record_id={record}"
    ))
    .await;
    assert_eq!(one["items"][0]["id"], record.as_str());
    let (_, users) = get(format!("{base}/authority-records?kind=user")).await;
    assert_eq!(users["items"], json!([]));

    let (_, alpha) = get(format!("{base}/sessions?label=alpha")).await;
    let ids: Vec<&str> = alpha["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["agent_session_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["s-a", "s-c"]);
    assert_eq!(alpha["items"][0]["subject_id"], world.app_id.as_str());
    assert_eq!(alpha["items"][0]["federated_user_id"], Value::Null);
    let (_, active) = get(format!("{base}/sessions?status=active&label=alpha")).await;
    assert_eq!(active["items"].as_array().unwrap().len(), 1);
    let (_, by_subject) = get(format!("{base}/sessions?subject_id={}", world.app_id)).await;
    assert_eq!(by_subject["items"].as_array().unwrap().len(), 3);
    let (_, nobody) = get(format!("{base}/sessions?subject_id=someone-else")).await;
    assert_eq!(nobody["items"], json!([]));

    for (path, code) in [
        (format!("{base}/sessions?status=zombie"), "invalid_request"),
        (format!("{base}/sessions?colour=red"), "invalid_request"),
        (
            format!("{base}/authority-records?limit=0"),
            "invalid_request",
        ),
        (
            format!("{base}/authority-records?kind=robot"),
            "invalid_request",
        ),
        (
            format!("{base}/admin-audit?since=yesterday"),
            "invalid_request",
        ),
        (format!("{base}/admin-audit?format=xml"), "invalid_request"),
        ("/v1/zones/no-such-zone/sessions".to_owned(), "not_found"),
    ] {
        let (status, body) = get(path.clone()).await;
        assert!(status.is_client_error(), "{path}: {status} {body}");
        assert_eq!(body["error"], code, "{path}: {body}");
    }
}

/// Revoking a delegated grant cuts every authority path of its user first, as the kill switch
/// does; the grant stays listed as revoked.
#[tokio::test]
async fn revoking_a_grant_revokes_its_users_authority_records() {
    let world = world().await;
    let store = world.shared.store.as_ref();
    let now = caracal_store::now_ms();
    let record = caracal_store::AuthorityRecord {
        id: "ar-alice".into(),
        zone_id: world.zone_id.clone(),
        session_type: "user".into(),
        subject_id: "alice".into(),
        parent_id: None,
        status: "active".into(),
        claims: "{}".into(),
        expires_at_ms: now + 600_000,
        authenticated_at_ms: now,
        created_at_ms: now,
        revoked_at_ms: None,
        revoked_reason: None,
    };
    store.insert_authority_records(&[record]).await.unwrap();
    let w = Some(world.writer.as_str());
    let base = format!("/v1/zones/{}/grants", world.zone_id);
    let body = json!({"application_id": world.app_id, "user_id": "alice",
        "resource_id": "resource://ledger", "scopes": ["ledger:read"]});
    let (status, _, grant) = call(&world.api, "POST", &base, w, &body.to_string()).await;
    assert_eq!(status, StatusCode::CREATED, "{grant}");
    assert!(grant["resource_identifier"] == "resource://ledger");
    let path = format!("{base}/{}", grant["id"].as_str().unwrap());
    let (status, _, _) = call(&world.api, "DELETE", &path, w, "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, _, revoked) = call(&world.api, "GET", &path, w, "").await;
    assert_eq!(revoked["status"], "revoked");
    let record = store
        .get_authority_record(&world.zone_id, "ar-alice")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (record.status.as_str(), record.revoked_reason.as_deref()),
        ("revoked", Some("grant_revoked"))
    );
}

/// Only the STS's ring opens private keys: a verifying ring loads a zone's public keys even
/// under a KEK that cannot open the private half, which the signing ring refuses.
#[tokio::test]
async fn only_the_signing_key_ring_opens_private_keys() {
    let world = world().await;
    let store = world.shared.store.as_ref();
    let foreign = caracal_crypto::Kek::generate().unwrap();
    let verifying = crate::keys::KeyRing::default()
        .zone(store, &foreign, &world.zone_id)
        .await
        .unwrap();
    assert!(verifying.signer.is_none());
    assert!(!verifying.verifiers.is_empty());
    assert!(matches!(
        crate::keys::KeyRing::signing()
            .zone(store, &foreign, &world.zone_id)
            .await,
        Err(crate::keys::KeyError::Unopenable(_))
    ));
    let signing = crate::keys::KeyRing::signing()
        .zone(store, &world.shared.kek, &world.zone_id)
        .await
        .unwrap();
    assert_eq!(
        signing.signer.as_ref().map(|signer| signer.kid.as_str()),
        verifying
            .verifiers
            .first()
            .map(|verifier| verifier.kid.as_str())
    );
}

#[tokio::test]
async fn an_operators_lower_mint_limit_applies_at_the_next_refresh_and_never_raises() {
    assert_eq!(super::effective_mint_limit(100, None), 100);
    assert_eq!(super::effective_mint_limit(100, Some(7)), 7);
    assert_eq!(
        super::effective_mint_limit(100, Some(500)),
        100,
        "never raised"
    );
    assert_eq!(super::effective_mint_limit(100, Some(0)), 1);
    let world = world().await;
    let mut state = RoleState::new(Role::Sts, world.shared.clone());
    let sts = Arc::new(
        Sts::start(
            ISSUER.to_owned(),
            world.core.policies.clone(),
            world.shared.store.clone(),
            &world.shared.kek,
        )
        .with_mint_limit(50),
    );
    state.sts = Some(Arc::clone(&sts));
    let limited = router(state);
    let setting = caracal_store::DeploymentSetting {
        name: super::MINT_LIMIT_SETTING.to_owned(),
        value: "1".to_owned(),
        updated_by: "admin:test".to_owned(),
        updated_at_ms: caracal_store::now_ms(),
    };
    world.shared.store.put_setting(&setting, &[]).await.unwrap();
    assert_eq!(sts.mint_limit(), 50, "not before the refresh");
    sts.refresh_mint_limit(world.shared.store.as_ref())
        .await
        .unwrap();
    assert_eq!(sts.mint_limit(), 1);
    // A store that cannot answer leaves the limit in force as it was.
    world.store.down.store(true, Ordering::SeqCst);
    assert!(
        sts.refresh_mint_limit(world.shared.store.as_ref())
            .await
            .is_err()
    );
    world.store.down.store(false, Ordering::SeqCst);
    assert_eq!(sts.mint_limit(), 1);
    let body = world.form(&[
        ("scope", "agent:lifecycle"),
        ("resource", "resource://ledger"),
    ]);
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let response = limited
            .clone()
            .oneshot(
                Request::post("/oauth/2/token")
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Body::from(body.clone()))
                    .unwrap(),
            )
            .await
            .unwrap();
        statuses.push(response.status());
    }
    // Windows are aligned to the minute: a boundary between the calls resets the count.
    assert!(
        statuses == [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]
            || statuses == [StatusCode::OK, StatusCode::OK],
        "{statuses:?}"
    );
}
