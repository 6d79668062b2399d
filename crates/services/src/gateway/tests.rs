#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use caracal_core::Role;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::exchange::{Exchanger, RemoteSts};
use super::{Gateway, GatewayConfig};
use crate::router;
use crate::state::RoleState;
use crate::sts::tests::{World, audit_events, world};
use crate::test_support::call;

/// What the loopback upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    headers: HeaderMap,
}

type SeenLog = Arc<Mutex<Vec<Seen>>>;

/// A loopback upstream: `/api/stream` trickles twenty chunks, a query of `slow=1` answers
/// after a second, everything else answers JSON at once.
async fn upstream() -> (SocketAddr, SeenLog) {
    let seen: SeenLog = Arc::default();
    let log = Arc::clone(&seen);
    let app = axum::Router::new().fallback(move |request: Request<Body>| {
        let log = Arc::clone(&log);
        async move {
            log.lock().unwrap().push(Seen {
                method: request.method().to_string(),
                uri: request.uri().to_string(),
                headers: request.headers().clone(),
            });
            if request.uri().path() == "/token" {
                return axum::response::Response::builder()
                    .header("content-type", "application/json")
                    .body(Body::from(
                        r#"{"access_token":"cc-1","token_type":"Bearer","expires_in":3600}"#,
                    ))
                    .unwrap();
            }
            if request.uri().query() == Some("slow=1") {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if request.uri().path() == "/api/stream" {
                return axum::response::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::new(ticks(20, Duration::from_millis(40))))
                    .unwrap();
            }
            axum::response::Response::builder()
                .header("content-type", "application/json")
                .header("server", "upstream/1.0")
                .header("location", "http://elsewhere.example/x")
                .header("x-caracal-identity", "leak")
                .header("x-caracal-refused-by", "gateway")
                .body(Body::from(r#"{"entries":[1,2,3]}"#))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (address, seen)
}

/// A body of `left` chunks `interval` apart.
struct Ticks {
    left: usize,
    interval: tokio::time::Interval,
}

fn ticks(left: usize, interval: Duration) -> Ticks {
    Ticks {
        left,
        interval: tokio::time::interval(interval),
    }
}

impl http_body::Body for Ticks {
    type Data = axum::body::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<axum::body::Bytes>, std::io::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        match self.interval.poll_tick(cx) {
            std::task::Poll::Ready(_) => {
                self.left -= 1;
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(
                    axum::body::Bytes::from_static(b"data: tick\n\n"),
                ))))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

/// The STS world plus a Gateway (in-process exchange) in front of a loopback upstream, with a
/// live session, its delegation edge, and the resource pointed at the upstream.
struct Fixture {
    world: World,
    gateway: Arc<Gateway>,
    router: axum::Router,
    seen: SeenLog,
    upstream: SocketAddr,
    resource_id: String,
}

async fn fixture() -> Fixture {
    let world = world().await;
    world.gateway_delegation().await;
    let (upstream, seen) = upstream().await;
    let w = Some(world.writer.as_str());
    let (_, _, resources) = call(
        &world.api,
        "GET",
        &format!("/v1/zones/{}/resources", world.zone_id),
        w,
        "",
    )
    .await;
    let resource_id = resources["items"][0]["id"].as_str().unwrap().to_owned();
    let mut fixture = Fixture {
        gateway: Arc::new(
            Gateway::new(
                GatewayConfig::new("http://127.0.0.1:1".into()),
                Exchanger::InProcess(world.core.clone()),
                Arc::default(),
            )
            .unwrap(),
        ),
        router: axum::Router::new(),
        world,
        seen,
        upstream,
        resource_id,
    };
    fixture
        .use_provider(json!({"name": "jwt", "kind": "caracal_mandate"}))
        .await;
    fixture.point_at(&format!("http://{upstream}/api")).await;
    fixture
        .gateway
        .revocations
        .reload(fixture.world.shared.store.as_ref())
        .await
        .unwrap();
    fixture.gateway.revocations.stream_followed();
    fixture.router = fixture.router_for(Arc::clone(&fixture.gateway));
    fixture
}

impl Fixture {
    fn router_for(&self, gateway: Arc<Gateway>) -> axum::Router {
        let mut state = RoleState::new(Role::Gateway, self.world.shared.clone());
        state.gateway = Some(gateway);
        router(state)
    }

    async fn point_at(&self, url: &str) {
        let (status, _, body) = call(
            &self.world.api,
            "PATCH",
            &format!(
                "/v1/zones/{}/resources/{}",
                self.world.zone_id, self.resource_id
            ),
            Some(&self.world.writer),
            &json!({"upstream_url": url}).to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// Binds the resource to a new provider; returns the provider's id.
    async fn use_provider(&self, provider: Value) -> String {
        let mut provider = provider;
        provider["identifier"] = json!(format!("provider://p{}", uuid::Uuid::now_v7().simple()));
        let (status, _, created) = call(
            &self.world.api,
            "POST",
            &format!("/v1/zones/{}/providers", self.world.zone_id),
            Some(&self.world.writer),
            &provider.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let (status, _, body) = call(
            &self.world.api,
            "PATCH",
            &format!(
                "/v1/zones/{}/resources/{}",
                self.world.zone_id, self.resource_id
            ),
            Some(&self.world.writer),
            &json!({"credential_provider_id": created["id"]}).to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        created["id"].as_str().unwrap().to_owned()
    }

    /// A fresh one-shot `use=gateway` mandate for the live edge.
    async fn mint(&self) -> String {
        let (status, _, body) = self
            .world
            .exchange(&self.world.delegated("g-target", "g-edge", "ledger:read"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    fn request(&self, method: &str, path: &str, token: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header("x-caracal-resource", "resource://ledger")
    }

    async fn send_to(&self, router: &axum::Router, request: Request<Body>) -> Answer {
        let response = router.clone().oneshot(request).await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            bytes: bytes.len(),
        }
    }

    async fn send(&self, request: Request<Body>) -> Answer {
        self.send_to(&self.router, request).await
    }

    async fn get(&self, path: &str) -> Answer {
        let token = self.mint().await;
        self.call(&self.router, "GET", path, &token).await
    }

    /// `method path` with `token` and no body, through `router`.
    async fn call(&self, router: &axum::Router, method: &str, path: &str, token: &str) -> Answer {
        self.send_to(
            router,
            self.request(method, path, token)
                .body(Body::empty())
                .unwrap(),
        )
        .await
    }

    fn upstream_calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn last_seen(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    json: Value,
    bytes: usize,
}

impl Answer {
    fn refused(&self) -> (StatusCode, &str, &str) {
        (
            self.status,
            self.json["error"].as_str().unwrap_or_default(),
            self.json["error_description"].as_str().unwrap_or_default(),
        )
    }
}

#[tokio::test]
async fn a_governed_call_reaches_the_upstream_with_the_resource_mandate_and_nothing_of_the_caller()
{
    let fixture = fixture().await;
    let token = fixture.mint().await;
    let mut request = fixture
        .request("GET", "/entries?q=1&limit=5", &token)
        .header("x-request-id", "call-1")
        .header("x-caracal-session", "forged")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=6.6.6.6")
        .header("x-real-ip", "6.6.6.6")
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("proxy-authorization", "Basic x")
        .header("baggage", "caracal.session=abc,tenant=blue")
        .header("accept", "application/json")
        .body(Body::empty())
        .unwrap();
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([10, 9, 8, 7], 5555))));
    let answer = fixture.send(request).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(answer.json, json!({"entries": [1, 2, 3]}));
    // The response: no banner, no absolute redirect target, no identity echo.
    assert!(answer.headers.get("server").is_none());
    assert!(answer.headers.get("location").is_none());
    assert!(answer.headers.get("x-caracal-identity").is_none());
    assert!(
        answer.headers.get(super::REFUSED_BY).is_none(),
        "an upstream cannot pass for a Gateway refusal"
    );
    assert_eq!(answer.headers["x-request-id"], "call-1");
    let expires_in: i64 = answer.headers["x-caracal-token-expires-in"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((35..=900).contains(&expires_in), "{expires_in}");

    let seen = fixture.last_seen();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.uri, "/api/entries?limit=5&q=1");
    let header = |name: &str| {
        seen.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    // The upstream's credential is a use=resource mandate for this resource, verifiable with
    // the zone's published keys; the caller's gateway mandate never reaches it.
    let bearer = header("authorization").unwrap();
    let resource_mandate = bearer.strip_prefix("Bearer ").unwrap();
    assert_ne!(resource_mandate, token);
    let claims = fixture.world.verify(resource_mandate).await.unwrap();
    assert_eq!(claims.use_, "resource");
    assert_eq!(claims.aud, ["resource://ledger"]);
    assert_eq!(claims.agent_session_id.as_deref(), Some("g-target"));
    for stripped in [
        "x-caracal-session",
        "x-caracal-resource",
        "forwarded",
        "x-real-ip",
        "x-hop",
        "connection",
        "proxy-authorization",
    ] {
        assert_eq!(
            header(stripped),
            None,
            "{stripped} must not reach the upstream"
        );
    }
    assert_eq!(
        header("x-forwarded-for").as_deref(),
        Some("10.9.8.7"),
        "fresh, not appended"
    );
    assert_eq!(header("x-forwarded-host"), None, "the caller sent no Host");
    assert_eq!(header("baggage").as_deref(), Some("tenant=blue"));
    assert_eq!(header("x-request-id").as_deref(), Some("call-1"));
    assert_eq!(header("accept").as_deref(), Some("application/json"));
    assert!(header("traceparent").unwrap().starts_with("00-"));

    // One audit event for the call, with the outcome and without the token.
    let events = audit_events(&fixture.world.shared).await;
    let event = events
        .iter()
        .find(|event| event["event_type"] == "gateway_resource_request")
        .expect("the call is audited");
    assert_eq!(event["request_id"], "call-1");
    assert_eq!(event["decision"], "allow");
    assert_eq!(event["evaluation_status"], "executed");
    let metadata = &event["metadata_json"];
    assert_eq!(metadata["upstream_status"], 200);
    assert_eq!(metadata["auth_mode"], "caracal_jwt");
    assert_eq!(metadata["result_class"], "success");
    assert_eq!(metadata["response_bytes"], 19);
    assert!(!event.to_string().contains(&token));
    // The call is correlated by a fingerprint: the first 8 bytes of the mandate's SHA-256.
    let fingerprint = caracal_crypto::hex(&caracal_crypto::sha256(token.as_bytes())[..8]);
    assert_eq!(metadata["subject_fingerprint"], fingerprint.as_str());

    // The same mandate again: a replay, refused before the STS or the upstream.
    let calls = fixture.upstream_calls();
    let again = fixture
        .call(&fixture.router, "GET", "/entries", &token)
        .await;
    assert_eq!(
        again.refused(),
        (
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "token replay detected"
        )
    );
    assert_eq!(fixture.upstream_calls(), calls);
    let events = audit_events(&fixture.world.shared).await;
    let replay = events
        .iter()
        .find(|event| event["event_type"] == "replay_detected")
        .expect("the replay is audited");
    assert_eq!(
        replay["metadata_json"]["subject_fingerprint"],
        fingerprint.as_str()
    );
}

/// After a restart the embedded register has forgotten the `jti`s it claimed: a mandate issued
/// before the previous process's bound is refused (it may have been used), one issued after it
/// goes through.
#[tokio::test]
async fn after_a_restart_mandates_issued_before_the_forgotten_claims_are_refused() {
    let fixture = fixture().await;
    let token = fixture.mint().await;
    let used = fixture
        .call(&fixture.router, "GET", "/entries", &token)
        .await;
    assert_eq!(used.status, StatusCode::OK, "{}", used.json);

    let mut shared = fixture.world.shared.clone();
    let registry = caracal_bus::EmbeddedBus::new(fixture.world.store.inner.clone());
    let bound = caracal_bus::ReplayRegistry::forgotten_before_ms(
        &registry,
        caracal_bus::ReplayNamespace::GatewayJti,
    );
    shared.bus.replay = Arc::new(registry);
    let mut state = RoleState::new(Role::Gateway, shared);
    state.gateway = Some(Arc::clone(&fixture.gateway));
    let restarted = router(state);
    let calls = fixture.upstream_calls();
    let again = fixture.call(&restarted, "GET", "/entries", &token).await;
    assert_eq!(
        again.refused(),
        (
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "mandate issued before the gateway restarted; mint a new one"
        )
    );
    assert_eq!(fixture.upstream_calls(), calls);

    // `iat` is in whole seconds: a mandate minted a second after the bound is newer than it.
    let wait = bound + 1_000 - caracal_store::now_ms();
    tokio::time::sleep(Duration::from_millis(u64::try_from(wait.max(0)).unwrap())).await;
    let fresh = fixture.mint().await;
    let answer = fixture.call(&restarted, "GET", "/entries", &fresh).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
}

#[tokio::test]
async fn malformed_calls_are_refused_with_their_code_before_anything_is_contacted() {
    let fixture = fixture().await;
    let token = fixture.mint().await;
    let long = "a".repeat(super::MAX_BEARER_BYTES + 1);
    let expired = {
        // A structurally valid token whose exp is inside the pre-flight window.
        use base64::Engine as _;
        let payload =
            json!({"exp": caracal_store::now_ms() / 1000 + 10, "zone_id": "z", "client_id": "c"});
        format!(
            "e30.{}.sig",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload.to_string())
        )
    };
    let cases: Vec<(Request<Body>, StatusCode, &str, &str)> = vec![
        (
            Request::get("/entries")
                .header("x-caracal-resource", "resource://ledger")
                .body(Body::empty())
                .unwrap(),
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "missing bearer token",
        ),
        (
            fixture
                .request("GET", "/entries", &long)
                .body(Body::empty())
                .unwrap(),
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "bearer token too large",
        ),
        (
            fixture
                .request("GET", "/entries", "not.a-token")
                .body(Body::empty())
                .unwrap(),
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "malformed bearer token",
        ),
        (
            fixture
                .request("GET", "/entries", &expired)
                .body(Body::empty())
                .unwrap(),
            StatusCode::UNAUTHORIZED,
            "credential_expired_not_renewable",
            "credential expiring within pre-flight window",
        ),
        (
            fixture
                .request("GET", "/entries", &token)
                .header("x-caracal-client-id", "x")
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_token",
            "client identity derives from the bearer token",
        ),
        (
            Request::get("/entries")
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_token",
            "missing routing headers",
        ),
        (
            fixture
                .request("GET", "/a/../entries", &token)
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_token",
            "path traversal not permitted",
        ),
        (
            fixture
                .request("GET", "/a/%2e%2e/entries", &token)
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_token",
            "path traversal not permitted",
        ),
        (
            fixture
                .request("GET", "/a/%252e%252e%252fentries", &token)
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_token",
            "path traversal not permitted",
        ),
        (
            fixture
                .request("GET", "/a%5c..%5centries", &token)
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_token",
            "path traversal not permitted",
        ),
        (
            fixture
                .request(
                    "GET",
                    "/entries",
                    &format!("{}x", &token[..token.len() - 2]),
                )
                .body(Body::empty())
                .unwrap(),
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "bearer signature invalid",
        ),
    ];
    for (request, status, code, description) in cases {
        let answer = fixture.send(request).await;
        assert_eq!(
            answer.refused(),
            (status, code, description),
            "{}",
            answer.json
        );
        assert!(answer.json["requestId"].is_string());
        assert_eq!(answer.headers[super::REFUSED_BY], "gateway");
    }
    assert_eq!(fixture.upstream_calls(), 0);
    // None of these spent the real mandate: it still works once.
    let answer = fixture
        .call(&fixture.router, "GET", "/entries", &token)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
}

#[tokio::test]
async fn an_operator_reloads_a_stale_view_at_once_and_nobody_else_can() {
    let fixture = fixture().await;
    let gateway = Arc::new(
        Gateway::new(
            GatewayConfig::new("http://127.0.0.1:1".into()),
            Exchanger::InProcess(fixture.world.core.clone()),
            Arc::default(),
        )
        .unwrap(),
    );
    gateway.revocations.stream_followed();
    let router = fixture.router_for(Arc::clone(&gateway));
    let shared = &fixture.world.shared;
    let writer =
        crate::test_support::token(shared, "write", caracal_store::TokenScope::Global).await;
    let reader =
        crate::test_support::token(shared, "read", caracal_store::TokenScope::Global).await;
    let zoned = crate::test_support::token(
        shared,
        "write",
        caracal_store::TokenScope::Zone("zone-1".into()),
    )
    .await;
    let path = "/internal/revocations/reload";
    for (bearer, status, code) in [
        (None, StatusCode::UNAUTHORIZED, "invalid_admin_token"),
        (
            Some(&reader),
            StatusCode::FORBIDDEN,
            "admin_token_read_only",
        ),
        (
            Some(&zoned),
            StatusCode::FORBIDDEN,
            "admin_token_zone_mismatch",
        ),
    ] {
        let (got, _, answer) = call(&router, "POST", path, bearer.map(String::as_str), "").await;
        assert_eq!((got, answer["error"].as_str()), (status, Some(code)));
    }
    let token = fixture.mint().await;
    let answer = fixture.call(&router, "GET", "/entries", &token).await;
    assert_eq!(answer.refused().1, "revocation_snapshot_stale");
    let (status, _, reloaded) = call(&router, "POST", path, Some(&writer), "").await;
    assert_eq!(status, StatusCode::OK, "{reloaded}");
    assert_eq!(
        (&reloaded["reloaded"], &reloaded["fresh"]),
        (&json!(true), &json!(true))
    );
    let token = fixture.mint().await;
    let answer = fixture.call(&router, "GET", "/entries", &token).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    let (status, _, _) = call(&router, "GET", path, Some(&writer), "").await;
    assert_eq!(
        status,
        StatusCode::METHOD_NOT_ALLOWED,
        "the path is never proxied"
    );
}

#[tokio::test]
async fn every_fail_closed_condition_refuses_and_the_upstream_sees_nothing() {
    let fixture = fixture().await;

    // A view never confirmed against the store: stale.
    let unconfirmed = Arc::new(
        Gateway::new(
            GatewayConfig::new("http://127.0.0.1:1".into()),
            Exchanger::InProcess(fixture.world.core.clone()),
            Arc::default(),
        )
        .unwrap(),
    );
    let stale = fixture.router_for(Arc::clone(&unconfirmed));
    let token = fixture.mint().await;
    let answer = fixture.call(&stale, "GET", "/entries", &token).await;
    assert_eq!(
        answer.refused(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "revocation_snapshot_stale",
            "revocation state unavailable"
        )
    );
    let (status, _, ready) = call(&stale, "GET", "/ready", None, "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["reason"], "revocation_snapshot_stale");
    // Confirmed by the store but its stream never read (the bus down): still stale.
    unconfirmed
        .revocations
        .reload(fixture.world.shared.store.as_ref())
        .await
        .unwrap();
    let token = fixture.mint().await;
    let answer = fixture.call(&stale, "GET", "/entries", &token).await;
    assert_eq!(answer.refused().1, "revocation_snapshot_stale");
    unconfirmed.revocations.stream_followed();
    assert!(
        unconfirmed
            .revocations
            .is_fresh(Duration::from_secs(31), caracal_store::now_ms())
    );
    assert!(
        !unconfirmed
            .revocations
            .is_fresh(Duration::from_secs(31), caracal_store::now_ms() + 32_000),
        "a stream last read 32 s ago is stale"
    );

    // The STS unreachable: three refusals open the circuit, then it fails fast.
    let remote = Arc::new(
        Gateway::new(
            GatewayConfig::new("http://127.0.0.1:1".into()),
            Exchanger::Remote(Box::new(
                RemoteSts::new(
                    "http://127.0.0.1:1",
                    fixture
                        .world
                        .shared
                        .kek
                        .derive(crate::gateway_sts::KEY_LABEL),
                    Duration::from_secs(1),
                )
                .unwrap(),
            )),
            Arc::default(),
        )
        .unwrap(),
    );
    remote
        .revocations
        .reload(fixture.world.shared.store.as_ref())
        .await
        .unwrap();
    remote.revocations.stream_followed();
    let remote_router = fixture.router_for(Arc::clone(&remote));
    for _ in 0..3 {
        let token = fixture.mint().await;
        let answer = fixture
            .call(&remote_router, "GET", "/entries", &token)
            .await;
        assert_eq!(
            answer.refused(),
            (
                StatusCode::BAD_GATEWAY,
                "sts_unavailable",
                "sts unavailable"
            )
        );
    }
    assert_eq!(remote.circuit.state(), super::exchange::CircuitState::Open);
    let token = fixture.mint().await;
    let answer = fixture
        .call(&remote_router, "GET", "/entries", &token)
        .await;
    assert_eq!(
        answer.refused(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "sts_unavailable",
            "sts unavailable"
        )
    );
    assert_eq!(answer.headers["retry-after"], "1");
    assert_eq!(remote.metrics.sts_circuit_fast_fail.get(), 1);
    remote.metrics.observe(&remote);
    assert_eq!(remote.metrics.sts_circuit_state.get(), 1);
    let (status, _, ready) = call(&remote_router, "GET", "/ready", None, "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["reason"], "sts_unreachable");

    // The zone's keys cannot be read (the store is down): no signature can be checked.
    let token = fixture.mint().await;
    fixture.world.store.down.store(true, Ordering::SeqCst);
    let answer = fixture
        .call(&fixture.router, "GET", "/entries", &token)
        .await;
    fixture.world.store.down.store(false, Ordering::SeqCst);
    assert_eq!(
        answer.refused(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "sts_unavailable",
            "signing keys unavailable"
        )
    );

    // Evidence lost: nothing protected passes.
    let mut shared = fixture.world.shared.clone();
    let (evidence, _lost) = crate::test_support::lost_evidence().await;
    shared.evidence = evidence;
    let mut state = RoleState::new(Role::Gateway, shared);
    state.gateway = Some(Arc::clone(&fixture.gateway));
    let lost = router(state);
    let token = fixture.mint().await;
    let answer = fixture.call(&lost, "GET", "/entries", &token).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.json["error"], "audit_evidence_lost");

    // A revoked anchor: the edge revoked in the store, seen through the snapshot.
    let store = fixture.world.shared.store.as_ref();
    let token = fixture.mint().await;
    store
        .revoke_delegation_tree(
            &fixture.world.zone_id,
            "g-edge",
            "test",
            crate::propagation::revocations,
        )
        .await
        .unwrap();
    fixture.gateway.revocations.reload(store).await.unwrap();
    let answer = fixture
        .call(&fixture.router, "GET", "/entries", &token)
        .await;
    assert_eq!(
        answer.refused(),
        (StatusCode::UNAUTHORIZED, "invalid_token", "session revoked")
    );

    assert_eq!(
        fixture.upstream_calls(),
        0,
        "no refusal reached the upstream"
    );
}

#[tokio::test]
async fn revocation_messages_mark_every_anchor_and_a_snapshot_keeps_concurrent_marks() {
    let fixture = fixture().await;
    let store = fixture.world.shared.store.as_ref();
    let token = fixture.mint().await;
    // Terminating the target session produces the messages the Coordinator publishes; the
    // Gateway applies them as they arrive on the stream.
    let tree = store
        .terminate_session_tree(
            &fixture.world.zone_id,
            "g-target",
            "test",
            crate::propagation::revocations,
        )
        .await
        .unwrap();
    let view = &fixture.gateway.revocations;
    let read_at = view.generation();
    let messages = crate::propagation::revocations(&tree);
    assert!(!messages.is_empty());
    for (index, message) in messages.iter().enumerate() {
        if message.stream != caracal_bus::stream_names::SESSIONS_REVOKE {
            continue;
        }
        let entry = caracal_bus::Entry {
            id: format!("{}-{index}", caracal_store::now_ms()),
            fields: message.fields.clone(),
            deliveries: 1,
        };
        assert!(view.apply_message(&entry));
    }
    // A snapshot read before the messages were applied does not erase them.
    view.apply_snapshot(caracal_store::RevokedAnchors::default(), read_at);
    let answer = fixture
        .call(&fixture.router, "GET", "/entries", &token)
        .await;
    assert_eq!(
        answer.refused(),
        (StatusCode::UNAUTHORIZED, "invalid_token", "session revoked")
    );
    // A message naming no anchor is not applied (it is left for the dead-letter path).
    let poison = caracal_bus::Entry {
        id: "1-0".into(),
        fields: [("zone_id".to_owned(), "z".to_owned())].into(),
        deliveries: 1,
    };
    assert!(!view.apply_message(&poison));
}

#[tokio::test]
async fn a_stream_is_cut_with_a_trailer_when_the_mandate_is_revoked_mid_response() {
    let fixture = fixture().await;
    // The stream path must be a declared operation.
    let (status, _, body) = call(
        &fixture.world.api,
        "PATCH",
        &format!(
            "/v1/zones/{}/resources/{}",
            fixture.world.zone_id, fixture.resource_id
        ),
        Some(&fixture.world.writer),
        &json!({"operations": [{"method": "GET", "path": "/entries", "scope": "ledger:read"},
                               {"method": "GET", "path": "/stream", "scope": "ledger:read"}]})
        .to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Unrevoked: all twenty chunks.
    let whole = fixture.get("/stream").await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.bytes, 20 * 12);

    let token = fixture.mint().await;
    let response = fixture
        .router
        .clone()
        .oneshot(
            fixture
                .request("GET", "/stream", &token)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["trailer"], "X-Caracal-Revoked");
    let mut body = response.into_body();
    let mut received = 0;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(data) = frame.data_ref() {
            received += data.len();
            if received == 3 * 12 {
                let entry = caracal_bus::Entry {
                    id: format!("{}-0", caracal_store::now_ms()),
                    fields: [("agent_session_id".to_owned(), "g-target".to_owned())].into(),
                    deliveries: 1,
                };
                fixture.gateway.revocations.apply_message(&entry);
            }
        } else if let Ok(found) = frame.into_trailers() {
            trailers = Some(found);
        }
    }
    assert!(received < 20 * 12, "the stream was cut ({received} bytes)");
    assert_eq!(trailers.unwrap()["x-caracal-revoked"], "true");
    assert_eq!(fixture.gateway.metrics.streams_revoked.get(), 1);
}

#[tokio::test]
async fn the_upstream_address_guard_refuses_metadata_and_kin_and_the_operation_floor_holds() {
    let fixture = fixture().await;
    for url in [
        "http://169.254.169.254/latest",
        "http://[::ffff:169.254.169.254]/",
        "http://0.0.0.0/",
        "http://224.0.0.251/",
        "http://[fe80::1]/",
        // Names that resolve to the metadata address (numeric forms the resolver accepts).
        "http://2852039166/",
        "http://0xa9fea9fe/",
    ] {
        fixture.point_at(url).await;
        let answer = fixture.get("/entries").await;
        assert_eq!(
            answer.refused(),
            (
                StatusCode::BAD_GATEWAY,
                "internal_error",
                "upstream not addressable"
            ),
            "{url}"
        );
    }
    let events = audit_events(&fixture.world.shared).await;
    assert!(
        events
            .iter()
            .any(|event| event["metadata_json"]["error_kind"] == "upstream_not_addressable")
    );

    // An https upstream is spoken to over TLS, never in clear: a plain-HTTP server there
    // fails the handshake and the call fails closed.
    fixture
        .point_at(&format!("https://{}/api", fixture.upstream))
        .await;
    let answer = fixture.get("/entries").await;
    assert_eq!(
        answer.refused(),
        (
            StatusCode::BAD_GATEWAY,
            "internal_error",
            "upstream unreachable"
        )
    );
    assert_eq!(fixture.upstream_calls(), 0, "nothing readable reached it");

    // An allowlist without the host refuses it too.
    fixture
        .point_at(&format!("http://{}/api", fixture.upstream))
        .await;
    let mut config = GatewayConfig::new("http://127.0.0.1:1".into());
    config.host_allowlist = vec!["api.example".into()];
    let pinned = Arc::new(
        Gateway::new(
            config,
            Exchanger::InProcess(fixture.world.core.clone()),
            Arc::default(),
        )
        .unwrap(),
    );
    pinned
        .revocations
        .reload(fixture.world.shared.store.as_ref())
        .await
        .unwrap();
    pinned.revocations.stream_followed();
    let token = fixture.mint().await;
    let answer = fixture
        .send_to(
            &fixture.router_for(pinned),
            fixture
                .request("GET", "/entries", &token)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        answer.refused(),
        (
            StatusCode::BAD_GATEWAY,
            "internal_error",
            "upstream not addressable"
        )
    );

    // Operation enforcement: an undeclared method or path never reaches the upstream.
    for (method, path) in [
        ("GET", "/other"),
        ("DELETE", "/entries"),
        ("POST", "/refunds"),
    ] {
        let token = fixture.mint().await;
        let answer = fixture
            .send(
                fixture
                    .request(method, path, &token)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(
            (answer.status, answer.json["error"].as_str().unwrap()),
            (StatusCode::FORBIDDEN, "operation_not_permitted"),
            "{method} {path}: {}",
            answer.json
        );
    }
    assert_eq!(fixture.upstream_calls(), 0);
}

#[tokio::test]
async fn provider_credentials_are_injected_as_configured_and_pinned_to_their_hosts() {
    let fixture = fixture().await;
    let header = |name: &str| {
        fixture
            .last_seen()
            .headers
            .get(name)
            .map(|value| value.to_str().unwrap().to_owned())
    };

    fixture
        .use_provider(json!({"name": "key", "kind": "api_key",
            "config_json": {"header_name": "X-Api-Key", "api_key": "k-123"}}))
        .await;
    assert_eq!(fixture.get("/entries").await.status, StatusCode::OK);
    assert_eq!(header("x-api-key").as_deref(), Some("k-123"));
    assert_eq!(header("authorization"), None);
    assert_eq!(header("x-caracal-identity"), None);

    fixture
        .use_provider(json!({"name": "query", "kind": "api_key",
            "config_json": {"query_param_name": "key", "api_key": "q-456", "forward_caracal_identity": true}}))
        .await;
    let token = fixture.mint().await;
    let answer = fixture
        .call(&fixture.router, "GET", "/entries?key=mine", &token)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(fixture.last_seen().uri, "/api/entries?key=q-456");
    let identity = header("x-caracal-identity").unwrap();
    assert_eq!(
        fixture.world.verify(&identity).await.unwrap().use_,
        "resource"
    );

    fixture
        .use_provider(json!({"name": "bearer", "kind": "bearer_token",
            "config_json": {"bearer_token": "b-789"}}))
        .await;
    assert_eq!(fixture.get("/entries").await.status, StatusCode::OK);
    assert_eq!(header("authorization").as_deref(), Some("Bearer b-789"));

    fixture
        .use_provider(json!({"name": "basic", "kind": "http_basic",
            "config_json": {"username": "svc", "password": "pw"}}))
        .await;
    assert_eq!(fixture.get("/entries").await.status, StatusCode::OK);
    assert_eq!(header("authorization").as_deref(), Some("Basic c3ZjOnB3"));

    fixture
        .use_provider(json!({"name": "none", "kind": "none"}))
        .await;
    assert_eq!(fixture.get("/entries").await.status, StatusCode::OK);
    assert_eq!(header("authorization"), None);

    // A credential pinned to other hosts is never sent to this one.
    let calls = fixture.upstream_calls();
    fixture
        .use_provider(json!({"name": "pinned", "kind": "bearer_token",
            "config_json": {"bearer_token": "b-1", "allowed_token_hosts": ["api.example"]}}))
        .await;
    let answer = fixture.get("/entries").await;
    assert_eq!(
        answer.refused(),
        (
            StatusCode::BAD_GATEWAY,
            "internal_error",
            "provider credential not allowed for upstream host"
        )
    );
    assert_eq!(fixture.upstream_calls(), calls);
}

#[tokio::test]
async fn an_authorization_code_provider_injects_the_subjects_connection_refreshed_before_use() {
    let fixture = fixture().await;
    let store = fixture.world.shared.store.clone();
    let authorization = || {
        fixture
            .last_seen()
            .headers
            .get("authorization")
            .map(|value| value.to_str().unwrap().to_owned())
    };
    // A token endpoint that records each refresh form and answers with a rotated pair, or
    // fails while told to.
    let forms = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token_endpoint = listener.local_addr().unwrap();
    let endpoint = axum::Router::new().fallback({
        let (forms, failing) = (forms.clone(), failing.clone());
        move |body: String| async move {
            forms.lock().unwrap().push(body);
            if failing.load(std::sync::atomic::Ordering::SeqCst) {
                return axum::response::IntoResponse::into_response(StatusCode::BAD_GATEWAY);
            }
            axum::response::IntoResponse::into_response(axum::Json(json!({
                "access_token": "fresh-2", "token_type": "Bearer", "expires_in": 3600,
                "refresh_token": "r-2",
            })))
        }
    });
    tokio::spawn(async move { axum::serve(listener, endpoint).await.unwrap() });
    let provider_id = fixture
        .use_provider(json!({"name": "drive", "kind": "oauth2_authorization_code",
            "config_json": {"token_url": format!("http://{token_endpoint}/token"),
                            "client_id": "c-1", "client_secret": "cs-1"}}))
        .await;
    let connect = async |body: Value| {
        let (status, _, stored) = call(
            &fixture.world.api,
            "POST",
            &format!("/v1/zones/{}/provider-connections", fixture.world.zone_id),
            Some(&fixture.world.writer),
            &body.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{stored}");
    };

    // The acting session's record is gone: no subject to act for, refused.
    let calls = fixture.upstream_calls();
    let answer = fixture.get("/entries").await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.json);
    assert!(
        answer.json.to_string().contains("authority record is gone"),
        "{}",
        answer.json
    );
    let now = caracal_store::now_ms();
    store
        .insert_authority_records(&[caracal_store::AuthorityRecord {
            id: "ar".into(),
            zone_id: fixture.world.zone_id.clone(),
            session_type: "user".into(),
            subject_id: "user-7".into(),
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
    // No connection: refused, the upstream never reached.
    let answer = fixture.get("/entries").await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.json);
    assert!(
        answer.json.to_string().contains("connection_required"),
        "{}",
        answer.json
    );
    assert_eq!(fixture.upstream_calls(), calls);
    connect(json!({"provider_id": provider_id, "access_token": "shared-1"})).await;
    // The zone's shared connection serves a subject without one of its own.
    assert_eq!(fixture.get("/entries").await.status, StatusCode::OK);
    assert_eq!(authorization().as_deref(), Some("Bearer shared-1"));

    // The acting session's subject has its own, expired: refreshed once, then used.
    connect(
        json!({"provider_id": provider_id, "subject_id": "user-7", "access_token": "stale-1",
        "refresh_token": "r-1", "expires_at": "2020-01-01T00:00:00Z"}),
    )
    .await;
    let answer = fixture.get("/entries").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(authorization().as_deref(), Some("Bearer fresh-2"));
    assert_eq!(
        forms.lock().unwrap().as_slice(),
        ["grant_type=refresh_token&refresh_token=r-1&client_id=c-1&client_secret=cs-1"]
    );
    let refreshed = store
        .get_provider_connection(&fixture.world.zone_id, "user-7", &provider_id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        refreshed.expires_at_ms.unwrap() > now + 3_000_000,
        "{refreshed:?}"
    );
    assert_eq!(fixture.get("/entries").await.status, StatusCode::OK);
    assert_eq!(authorization().as_deref(), Some("Bearer fresh-2"));
    assert_eq!(
        forms.lock().unwrap().len(),
        1,
        "a fresh token is not refreshed again"
    );
    let events = audit_events(&fixture.world.shared).await;
    assert!(
        events
            .iter()
            .any(|event| event["metadata_json"]["connection_id"] == refreshed.id.as_str()),
        "the call's event names the connection it used"
    );

    // Expired again with the token endpoint failing: 502, nothing sent upstream; expired with
    // no refresh token: refused.
    connect(
        json!({"provider_id": provider_id, "subject_id": "user-7", "access_token": "stale-2",
        "refresh_token": "r-2", "expires_at": "2020-01-01T00:00:00Z"}),
    )
    .await;
    failing.store(true, std::sync::atomic::Ordering::SeqCst);
    let calls = fixture.upstream_calls();
    assert_eq!(fixture.world.core.connection_refresh_failures.get(), 0);
    let answer = fixture.get("/entries").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.json);
    assert_eq!(fixture.world.core.connection_refresh_failures.get(), 1);
    connect(
        json!({"provider_id": provider_id, "subject_id": "user-7", "access_token": "stale-3",
        "expires_at": "2020-01-01T00:00:00Z"}),
    )
    .await;
    let answer = fixture.get("/entries").await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.json);
    assert_eq!(fixture.upstream_calls(), calls);

    // The subject's own connection, fresh, then revoked: the zone's shared connection (still
    // live) does not stand in for it.
    connect(json!({"provider_id": provider_id, "subject_id": "user-7", "access_token": "own-4"}))
        .await;
    assert_eq!(fixture.get("/entries").await.status, StatusCode::OK);
    assert_eq!(authorization().as_deref(), Some("Bearer own-4"));
    let (status, _, revoked) = call(
        &fixture.world.api,
        "POST",
        &format!(
            "/v1/zones/{}/provider-connections/revoke",
            fixture.world.zone_id
        ),
        Some(&fixture.world.writer),
        &json!({"provider_id": provider_id, "subject_id": "user-7"}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    let calls = fixture.upstream_calls();
    let answer = fixture.get("/entries").await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.json);
    assert!(
        answer.json.to_string().contains("was revoked"),
        "{}",
        answer.json
    );
    assert_eq!(fixture.upstream_calls(), calls);

    // The browser flow: a provider without an authorization URL cannot start it.
    let zone = fixture.world.zone_id.clone();
    let authorize_path = format!("/v1/zones/{zone}/provider-connections/oauth/authorize");
    let (status, _, refused) = call(
        &fixture.world.api,
        "POST",
        &authorize_path,
        Some(&fixture.world.writer),
        &json!({"provider_id": provider_id}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    let (status, _, refused) = call(
        &fixture.world.api,
        "POST",
        &format!("/v1/zones/{zone}/providers"),
        Some(&fixture.world.writer),
        &json!({"name": "js", "kind": "oauth2_authorization_code", "config_json": {
            "token_url": "https://idp.example/token", "client_id": "c",
            "authorization_url": "javascript:alert(1)"}})
        .to_string(),
    )
    .await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_body")),
        "{refused}"
    );
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    forms.lock().unwrap().clear();
    let callback =
        format!("https://caracal.example/v1/zones/{zone}/provider-connections/oauth/callback");
    let browser_provider = fixture
        .use_provider(json!({"name": "mail", "kind": "oauth2_authorization_code",
            "config_json": {"token_url": format!("http://{token_endpoint}/token"),
                            "authorization_url": "https://idp.example/authorize?prompt=consent",
                            "redirect_uri": callback, "scope": "mail.read",
                            "client_id": "c-2", "client_secret": "cs-2"}}))
        .await;
    let (status, _, started) = call(
        &fixture.world.api,
        "POST",
        &authorize_path,
        Some(&fixture.world.writer),
        &json!({"provider_id": browser_provider, "subject_id": "user-9"}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    let url = started["authorization_url"].as_str().unwrap();
    let (base, query) = url.split_once("?prompt=consent&").unwrap();
    assert_eq!(base, "https://idp.example/authorize");
    let query: std::collections::HashMap<String, String> =
        serde_urlencoded::from_str(query).unwrap();
    assert_eq!(query["response_type"], "code");
    assert_eq!(
        (query["client_id"].as_str(), query["redirect_uri"].as_str()),
        ("c-2", callback.as_str())
    );
    assert_eq!(
        (
            query["scope"].as_str(),
            query["code_challenge_method"].as_str()
        ),
        ("mail.read", "S256")
    );
    let sealed_state = query["state"].clone();

    // The callback: public, the sealed state its authority; anything else is refused.
    let callback_path =
        |query: &str| format!("/v1/zones/{zone}/provider-connections/oauth/callback?{query}");
    for bad in [
        format!("code=c&state={}x", &sealed_state[..sealed_state.len() - 1]),
        "code=c&state=forged".to_owned(),
        "error=access_denied".to_owned(),
        "code=c".to_owned(),
    ] {
        let (status, _, answer) =
            call(&fixture.world.api, "GET", &callback_path(&bad), None, "").await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "{bad}: {answer}"
        );
    }
    let other_zone = callback_path(
        &serde_urlencoded::to_string([("code", "c"), ("state", sealed_state.as_str())]).unwrap(),
    )
    .replace(&format!("/zones/{zone}/"), "/zones/another-zone/");
    let (status, _, _) = call(&fixture.world.api, "GET", &other_zone, None, "").await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a state is good only in its zone"
    );
    assert!(
        forms.lock().unwrap().is_empty(),
        "nothing refused reached the token endpoint"
    );
    let good = callback_path(
        &serde_urlencoded::to_string([("code", "the-code"), ("state", sealed_state.as_str())])
            .unwrap(),
    );
    let (status, _, connected) = call(&fixture.world.api, "GET", &good, None, "").await;
    assert_eq!(status, StatusCode::OK, "{connected}");
    assert_eq!(connected["connection"]["subject_id"], "user-9");
    let form: std::collections::HashMap<String, String> =
        serde_urlencoded::from_str(&forms.lock().unwrap()[0]).unwrap();
    assert_eq!(
        (form["grant_type"].as_str(), form["code"].as_str()),
        ("authorization_code", "the-code")
    );
    assert_eq!(
        (form["client_id"].as_str(), form["client_secret"].as_str()),
        ("c-2", "cs-2")
    );
    assert_eq!(form["redirect_uri"], callback);
    let challenge = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        caracal_crypto::sha256(form["code_verifier"].as_bytes()),
    );
    assert_eq!(
        challenge, query["code_challenge"],
        "PKCE: the verifier the state kept"
    );
    let stored = store
        .get_provider_connection(&zone, "user-9", &browser_provider)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, "connected");
    assert!(stored.refresh_token_ref.is_some() && stored.expires_at_ms.is_some());
}

/// The in-process re-exchange mints a `use=resource` mandate (a signature and an authority
/// record) only when the Gateway sends it upstream; otherwise the call leaves no record of a
/// token that never existed outside it, and still its evidence.
#[tokio::test]
async fn a_resource_mandate_is_minted_only_when_it_goes_upstream() {
    let fixture = fixture().await;
    let world = &fixture.world;
    let records = || async {
        world
            .shared
            .store
            .list_authority_records_of(&world.zone_id, &world.app_id)
            .await
            .unwrap()
            .len()
    };
    let minted_by_a_call = || async {
        let token = fixture.mint().await;
        let before = records().await;
        let answer = fixture
            .call(&fixture.router, "GET", "/entries", &token)
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
        records().await - before
    };
    // `caracal_mandate`: the mandate is the credential.
    assert_eq!(minted_by_a_call().await, 1);
    fixture
        .use_provider(json!({"name": "none", "kind": "none"}))
        .await;
    assert_eq!(minted_by_a_call().await, 0);
    fixture
        .use_provider(json!({"name": "key", "kind": "api_key",
            "config_json": {"header_name": "X-Api-Key", "api_key": "k-1"}}))
        .await;
    assert_eq!(minted_by_a_call().await, 0);
    fixture
        .use_provider(json!({"name": "key+id", "kind": "api_key",
            "config_json": {"header_name": "X-Api-Key", "api_key": "k-2", "forward_caracal_identity": true}}))
        .await;
    assert_eq!(
        minted_by_a_call().await,
        1,
        "forwarded as X-Caracal-Identity"
    );
}

#[test]
fn a_directive_carries_the_mandate_as_credential_or_beside_a_provider_credential() {
    let directive = |mode: &str, forward: bool| crate::wire::Upstream {
        url: "http://127.0.0.1:1".into(),
        auth_mode: mode.into(),
        auth_location: None,
        auth_header: None,
        query_param_name: None,
        auth_scheme: None,
        allowed_token_hosts: None,
        provider_token: None,
        provider_id: None,
        forward_caracal_identity: forward,
        token_url: None,
        client_id: None,
        token_scope: None,
        connection_id: None,
        expires_at: None,
    };
    let carried: Vec<(&str, bool, bool)> = [
        ("caracal_jwt", false),
        ("caracal_jwt", true),
        ("provider_apikey", false),
        ("provider_apikey", true),
        ("provider_oauth", true),
        ("none", true),
        ("unknown", true),
    ]
    .into_iter()
    .map(|(mode, forward)| (mode, forward, directive(mode, forward).carries_mandate()))
    .collect();
    assert_eq!(
        carried,
        [
            ("caracal_jwt", false, true),
            ("caracal_jwt", true, true),
            ("provider_apikey", false, false),
            ("provider_apikey", true, true),
            ("provider_oauth", true, true),
            ("none", true, false),
            ("unknown", true, false),
        ]
    );
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_before_the_upstream() {
    let fixture = fixture().await;
    let (status, _, body) = call(
        &fixture.world.api,
        "PATCH",
        &format!(
            "/v1/zones/{}/resources/{}",
            fixture.world.zone_id, fixture.resource_id
        ),
        Some(&fixture.world.writer),
        &json!({"operations": [{"method": "POST", "path": "/entries", "scope": "ledger:read"}]})
            .to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut config = GatewayConfig::new("http://127.0.0.1:1".into());
    config.max_request_bytes = 1024;
    let small = Arc::new(
        Gateway::new(
            config,
            Exchanger::InProcess(fixture.world.core.clone()),
            Arc::default(),
        )
        .unwrap(),
    );
    small
        .revocations
        .reload(fixture.world.shared.store.as_ref())
        .await
        .unwrap();
    small.revocations.stream_followed();
    let router = fixture.router_for(small);
    let token = fixture.mint().await;
    let answer = fixture
        .send_to(
            &router,
            fixture
                .request("POST", "/entries", &token)
                .header("content-length", "2048")
                .body(Body::from(vec![b'x'; 2048]))
                .unwrap(),
        )
        .await;
    assert_eq!(
        answer.refused(),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body too large"
        )
    );
    assert_eq!(fixture.upstream_calls(), 0);
    let token = fixture.mint().await;
    let answer = fixture
        .send_to(
            &router,
            fixture
                .request("POST", "/entries", &token)
                .body(Body::from(vec![b'x'; 512]))
                .unwrap(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
}

#[tokio::test]
async fn client_credentials_tokens_are_fetched_once_and_reused() {
    let fixture = fixture().await;
    fixture
        .use_provider(json!({"name": "cc", "kind": "oauth2_client_credentials",
            "config_json": {"token_url": format!("http://{}/token", fixture.upstream),
                            "client_id": "gw", "client_secret": "cc-secret", "scope": "read"}}))
        .await;
    for _ in 0..2 {
        let answer = fixture.get("/entries").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
        assert_eq!(fixture.last_seen().headers["authorization"], "Bearer cc-1");
    }
    let token_calls = fixture
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|seen| seen.uri == "/token")
        .count();
    assert_eq!(token_calls, 1, "the token is cached until near its expiry");

    // A token endpoint at a forbidden address is never called.
    fixture
        .use_provider(
            json!({"name": "cc-bad", "kind": "oauth2_client_credentials",
            "config_json": {"token_url": "http://169.254.169.254/token",
                            "client_id": "gw", "client_secret": "cc-secret"}}),
        )
        .await;
    let answer = fixture.get("/entries").await;
    assert_eq!(
        answer.refused(),
        (
            StatusCode::BAD_GATEWAY,
            "http_request_failed",
            "provider credential unavailable"
        )
    );
}

#[tokio::test]
async fn the_signed_http_exchange_reaches_a_separate_sts_and_a_down_replay_registry_refuses() {
    let fixture = fixture().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sts_address = listener.local_addr().unwrap();
    let sts = fixture.world.sts.clone();
    tokio::spawn(async move { axum::serve(listener, sts).await.unwrap() });
    let remote = Arc::new(
        Gateway::new(
            GatewayConfig::new(format!("http://{sts_address}")),
            Exchanger::Remote(Box::new(
                RemoteSts::new(
                    &format!("http://{sts_address}"),
                    fixture
                        .world
                        .shared
                        .kek
                        .derive(crate::gateway_sts::KEY_LABEL),
                    Duration::from_secs(5),
                )
                .unwrap(),
            )),
            Arc::default(),
        )
        .unwrap(),
    );
    remote
        .revocations
        .reload(fixture.world.shared.store.as_ref())
        .await
        .unwrap();
    remote.revocations.stream_followed();
    let remote_router = fixture.router_for(Arc::clone(&remote));
    let token = fixture.mint().await;
    let answer = fixture
        .call(&remote_router, "GET", "/entries", &token)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    let bearer = fixture.last_seen().headers["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    let claims = fixture
        .world
        .verify(bearer.strip_prefix("Bearer ").unwrap())
        .await
        .unwrap();
    assert_eq!(claims.use_, "resource");
    // A policy answer from the STS passes through with its status and code.
    let token = fixture.mint().await;
    let answer = fixture
        .call(&remote_router, "GET", "/undeclared", &token)
        .await;
    assert_eq!(
        (answer.status, answer.json["error"].as_str().unwrap()),
        (StatusCode::FORBIDDEN, "operation_not_permitted")
    );
    assert_eq!(
        remote.circuit.state(),
        super::exchange::CircuitState::Closed
    );
    let (status, _, ready) = call(&remote_router, "GET", "/ready", None, "").await;
    assert_eq!(status, StatusCode::OK, "{ready}");

    // With the replay registry down (Redis gone) no one-shot mandate can be checked.
    let mut shared = fixture.world.shared.clone();
    shared.bus.replay = Arc::new(crate::test_support::DownBus);
    let mut state = RoleState::new(Role::Gateway, shared);
    state.gateway = Some(Arc::clone(&fixture.gateway));
    let calls = fixture.upstream_calls();
    let token = fixture.mint().await;
    let answer = fixture
        .send_to(
            &router(state),
            fixture
                .request("GET", "/entries", &token)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        answer.refused(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "sts_unavailable",
            "replay registry unavailable"
        )
    );
    assert_eq!(fixture.upstream_calls(), calls);
}

#[tokio::test]
async fn the_stream_consumer_applies_signed_revocations_within_moments() {
    let fixture = fixture().await;
    let key = caracal_bus::signature::StreamKey::new(b"gateway-test-key");
    let streams = Arc::clone(&fixture.world.shared.bus.streams);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let metrics = Arc::new(super::GatewayMetrics::default());
    let task = tokio::spawn(super::revocation::follow_stream(
        Arc::clone(&fixture.gateway.revocations),
        Arc::clone(&streams),
        key.clone(),
        "replica-a".into(),
        Arc::clone(&metrics),
        stopped,
    ));
    let anchors = super::revocation::Anchors {
        sid: "ar-1".into(),
        root_sid: String::new(),
        agent_session_id: None,
        delegation_edge_id: None,
    };
    assert!(!fixture.gateway.revocations.is_revoked(&anchors));
    // A forged message (wrong key) is not applied.
    caracal_bus::Producer::new(
        Arc::clone(&streams),
        caracal_bus::signature::StreamKey::new(b"other"),
    )
    .publish(
        caracal_bus::stream_names::SESSIONS_REVOKE,
        [
            ("zone_id".to_owned(), "z".to_owned()),
            ("session_id".to_owned(), "ar-1".to_owned()),
            ("reason".to_owned(), "forged".to_owned()),
        ]
        .into(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !fixture.gateway.revocations.is_revoked(&anchors),
        "a forged revocation is ignored"
    );
    caracal_bus::Producer::new(Arc::clone(&streams), key)
        .publish(
            caracal_bus::stream_names::SESSIONS_REVOKE,
            [
                ("zone_id".to_owned(), "z".to_owned()),
                ("session_id".to_owned(), "ar-1".to_owned()),
                ("reason".to_owned(), "test".to_owned()),
            ]
            .into(),
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !fixture.gateway.revocations.is_revoked(&anchors) && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(fixture.gateway.revocations.is_revoked(&anchors));
    assert_eq!(metrics.revocation_messages.get(), 1);
    assert!(fixture.gateway.revocations.propagation_lag_seconds() < 5.0);
    stop.send(true).unwrap();
    task.await.unwrap();
}

mod fuzz {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn path_checks_and_token_peeks_never_panic(input in ".{0,300}") {
            let _ = super::super::is_traversal(&input);
            let _ = super::super::peek(&input);
            let _ = super::super::upstream::merge_query(Some(&input), Some(&input), Some(("k", &input)));
        }

        #[test]
        fn a_path_with_a_dot_segment_is_always_traversal(prefix in "[a-z/]{0,20}", encoded in prop::sample::select(vec!["..", "%2e%2e", "%2E.", "%252e%252e", "."])) {
            let path = format!("/{prefix}/{encoded}/x");
            prop_assert!(super::super::is_traversal(&path), "{}", path);
        }

        #[test]
        fn header_sanitising_never_keeps_caller_forwarding_or_caracal_headers(names in prop::collection::vec("[a-z-]{1,24}", 0..16)) {
            let mut headers = http::HeaderMap::new();
            for name in &names {
                if let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) {
                    headers.insert(name, http::HeaderValue::from_static("v"));
                }
            }
            headers.insert("x-caracal-x", http::HeaderValue::from_static("v"));
            headers.insert("x-forwarded-for", http::HeaderValue::from_static("1.1.1.1"));
            let clean = super::super::upstream::sanitise_request_headers(&headers);
            for name in clean.keys() {
                let name = name.as_str();
                prop_assert!(!name.starts_with("x-caracal-") && !name.starts_with("x-forwarded-"));
                prop_assert!(!["authorization", "forwarded", "x-real-ip", "connection", "te", "upgrade"].contains(&name));
            }
        }
    }
}

#[tokio::test]
async fn incident_containment_freezes_changes_and_fails_protected_traffic_closed() {
    let fixture = fixture().await;
    let w = Some(fixture.world.writer.as_str());
    let zone = fixture.world.zone_id.clone();
    let post = |path: &str, body: Value| {
        let api = fixture.world.api.clone();
        let path = path.to_owned();
        async move { call(&api, "POST", &path, w, &body.to_string()).await }
    };
    // A read token cannot contain; a reason is required.
    let reader = crate::test_support::token(
        &fixture.world.shared,
        "read",
        caracal_store::TokenScope::Global,
    )
    .await;
    let (status, _, _) = call(
        &fixture.world.api,
        "POST",
        "/v1/incident/contain",
        Some(&reader),
        &json!({"freeze": true, "reason": "drill"}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, refused) = post(
        "/v1/incident/contain",
        json!({"freeze": true, "reason": " "}),
    )
    .await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_body"))
    );

    // Freeze: provider and resource changes and activations wait; revocation does not.
    let (status, _, state) = post(
        "/v1/incident/contain",
        json!({"freeze": true, "reason": "tamper drill"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{state}");
    assert_eq!(state["frozen"], true);
    let (status, _, frozen) = post(
        &format!("/v1/zones/{zone}/providers"),
        json!({"name": "late", "identifier": "provider://late", "kind": "none"}),
    )
    .await;
    assert_eq!(
        (status, frozen["error"].as_str()),
        (StatusCode::LOCKED, Some("change_freeze"))
    );
    let (status, _, frozen) = call(
        &fixture.world.api,
        "PATCH",
        &format!("/v1/zones/{zone}/resources/{}", fixture.resource_id),
        w,
        &json!({"upstream_url": "http://127.0.0.1:1/x"}).to_string(),
    )
    .await;
    assert_eq!(
        (status, frozen["error"].as_str()),
        (StatusCode::LOCKED, Some("change_freeze"))
    );
    let (status, _, _) = post(
        &format!("/v1/zones/{zone}/subjects/nobody/revoke"),
        json!({"reason": "still allowed"}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "revocation stays allowed under a freeze"
    );
    // Calls still flow under a freeze.
    assert_eq!(fixture.get("/entries").await.status, StatusCode::OK);

    // Fail closed for the zone: the STS and the Gateway refuse with 503 `contained`.
    let (status, _, state) = post(
        "/v1/incident/contain",
        json!({"fail_closed": true, "zone_id": zone, "reason": "exposure"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{state}");
    let (status, _, minted) = fixture
        .world
        .exchange(&fixture.world.delegated("g-target", "g-edge", "ledger:read"))
        .await;
    assert_eq!(
        (status, minted["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("contained"))
    );
    let calls = fixture.upstream_calls();
    let release_token =
        |reason: &str| json!({"fail_closed": true, "zone_id": zone, "reason": reason});
    // A mandate minted before the containment is refused at the Gateway.
    post("/v1/incident/release", release_token("mint one")).await;
    let token = fixture.mint().await;
    post(
        "/v1/incident/contain",
        json!({"fail_closed": true, "zone_id": zone, "reason": "exposure"}),
    )
    .await;
    let answer = fixture
        .call(&fixture.router, "GET", "/entries", &token)
        .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.json["error"], "contained");
    assert_eq!(
        fixture.upstream_calls(),
        calls,
        "nothing reached the upstream"
    );

    // Release both; traffic and changes resume. Every action is audited with its reason.
    let (status, _, state) = post(
        "/v1/incident/release",
        json!({"freeze": true, "fail_closed": true, "zone_id": zone, "reason": "recovered"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{state}");
    // Releasing what is already off changes nothing and still answers the state.
    let (status, _, _) = post("/v1/incident/release", release_token("again")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, refused) = post(
        "/v1/incident/release",
        json!({"freeze": true, "zone_id": zone, "reason": "x"}),
    )
    .await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_body")),
        "a zone goes only with fail_closed"
    );
    let (_, _, state) = call(&fixture.world.api, "GET", "/v1/incident/containment", w, "").await;
    assert_eq!(state["switches"], json!([]));
    assert_eq!(fixture.get("/entries").await.status, StatusCode::OK);
    let outbox = fixture.world.shared.store.outbox_stats().await.unwrap();
    assert!(outbox.pending > 0);
    let events = crate::test_support::outbox_events(fixture.world.shared.store.as_ref()).await;
    let reasons: Vec<&str> = events
        .iter()
        .filter(|event| {
            event["event_type"]
                .as_str()
                .is_some_and(|kind| kind.starts_with("admin.incident."))
        })
        .filter_map(|event| event["metadata_json"]["reason"].as_str())
        .collect();
    assert!(
        reasons.contains(&"tamper drill")
            && reasons.contains(&"exposure")
            && reasons.contains(&"recovered"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn an_operator_terminates_a_session_and_the_gateway_refuses_its_mandates() {
    let fixture = fixture().await;
    let token = fixture.mint().await;
    let (status, _, ended) = call(
        &fixture.world.api,
        "POST",
        &format!(
            "/v1/zones/{}/sessions/g-target/terminate",
            fixture.world.zone_id
        ),
        Some(&fixture.world.writer),
        &json!({"reason": "compromised agent"}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{ended}");
    assert_eq!(ended["terminated_sessions"], json!(["g-target"]));
    assert_eq!(ended["revoked_edges"], json!(["g-edge"]));
    fixture
        .gateway
        .revocations
        .reload(fixture.world.shared.store.as_ref())
        .await
        .unwrap();
    let answer = fixture
        .call(&fixture.router, "GET", "/entries", &token)
        .await;
    assert_eq!(
        answer.refused(),
        (StatusCode::UNAUTHORIZED, "invalid_token", "session revoked")
    );
    let (status, _, missing) = call(
        &fixture.world.api,
        "POST",
        &format!(
            "/v1/zones/{}/sessions/nope/terminate",
            fixture.world.zone_id
        ),
        Some(&fixture.world.writer),
        &json!({"reason": "x"}).to_string(),
    )
    .await;
    assert_eq!(
        (status, missing["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}

#[tokio::test]
async fn revoking_an_application_or_invalidating_a_zone_stops_its_mandates_at_the_gateway() {
    for path in ["applications/{app}/revoke", "invalidate-sessions"] {
        let fixture = fixture().await;
        let token = fixture.mint().await;
        let path = format!(
            "/v1/zones/{}/{}",
            fixture.world.zone_id,
            path.replace("{app}", &fixture.world.app_id)
        );
        let (status, _, answer) = call(
            &fixture.world.api,
            "POST",
            &path,
            Some(&fixture.world.writer),
            &json!({"reason": "exposure drill"}).to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
        assert!(
            answer["terminated_sessions"]
                .as_array()
                .unwrap()
                .contains(&json!("g-target")),
            "{answer}"
        );
        fixture
            .gateway
            .revocations
            .reload(fixture.world.shared.store.as_ref())
            .await
            .unwrap();
        let answer = fixture
            .call(&fixture.router, "GET", "/entries", &token)
            .await;
        assert_eq!(
            answer.refused(),
            (StatusCode::UNAUTHORIZED, "invalid_token", "session revoked"),
            "{path}"
        );
        let (status, _, _) = fixture
            .world
            .exchange(&fixture.world.delegated("g-target", "g-edge", "ledger:read"))
            .await;
        assert_ne!(
            status,
            StatusCode::OK,
            "{path}: no new mint for an ended session"
        );
    }
}

/// The in-process exchange trusts the Gateway's signature check and its spent `jti`
/// (`GatewayCall::verified`) but nothing else: claims of another `use`, or of an authority
/// record revoked since, are refused; without the hand-over the STS verifies and spends the
/// `jti` itself, so a second presentation is a replay.
#[tokio::test]
async fn the_in_process_sts_checks_the_handed_over_claims_against_live_state() {
    use crate::gateway_sts::{GatewayCall, InProcessExchange as _};
    use base64::Engine as _;
    let fixture = fixture().await;
    let world = &fixture.world;
    let state = RoleState::new(Role::Sts, world.shared.clone());
    let claims_of = |token: &str| -> crate::wire::MandateClaims {
        let payload = token.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    let call_for = |token: &str, verified: Option<crate::wire::MandateClaims>| GatewayCall {
        zone_id: world.zone_id.clone(),
        application_id: world.app_id.clone(),
        token: token.to_owned(),
        resource: "resource://ledger".to_owned(),
        method: "GET".to_owned(),
        path: "/entries".to_owned(),
        verified,
    };

    // Without the hand-over: verified and spent by the STS, once.
    let token = fixture.mint().await;
    let first = world
        .core
        .exchange(&state, "r1", &call_for(&token, None))
        .await;
    assert!(first.is_ok(), "{first:?}");
    let again = world
        .core
        .exchange(&state, "r2", &call_for(&token, None))
        .await;
    assert_eq!(again.unwrap_err().description, "token replay detected");

    // Claims of another use are refused even when handed over.
    let token = fixture.mint().await;
    let mut claims = claims_of(&token);
    claims.use_ = "session".to_owned();
    let refused = world
        .core
        .exchange(&state, "r3", &call_for(&token, Some(claims)))
        .await
        .unwrap_err();
    assert!(refused.description.contains("use=gateway"), "{refused:?}");

    // An authority record revoked after the Gateway verified the mandate is refused.
    let token = fixture.mint().await;
    let claims = claims_of(&token);
    world
        .shared
        .store
        .revoke_authority_record(&world.zone_id, &claims.sid, "test", &[])
        .await
        .unwrap();
    let refused = world
        .core
        .exchange(&state, "r4", &call_for(&token, Some(claims)))
        .await
        .unwrap_err();
    assert!(
        refused.description.contains("no longer active"),
        "{refused:?}"
    );
}

/// The in-process re-exchange leaves its event's fsync to the call: a call is reported only
/// once both its own event and the exchange's are durable, and the loss of either is the
/// call's (503 `audit_evidence_lost`), whatever the upstream answered.
#[tokio::test]
async fn a_call_whose_exchange_evidence_is_lost_is_not_reported() {
    use crate::evidence::{EvidenceError, Pending};
    let fixture = fixture().await;
    let state = RoleState::new(Role::Gateway, fixture.world.shared.clone());
    let outcome = super::Outcome {
        evaluation_status: "executed",
        gateway_status: 200,
        upstream_status: Some(200),
        upstream_host: Some("127.0.0.1"),
        auth_mode: Some("none"),
        provider_id: None,
        connection_id: None,
        response_bytes: Some(2),
        error_kind: None,
    };
    let governed = |fate| super::Governed {
        request_id: "r-evidence".to_owned(),
        zone_id: fixture.world.zone_id.clone(),
        application_id: fixture.world.app_id.clone(),
        resource: "resource://ledger".to_owned(),
        method: "GET".to_owned(),
        fingerprint: "0011223344556677".to_owned(),
        sub_type: "application".to_owned(),
        anchors: super::revocation::Anchors {
            sid: "s".to_owned(),
            root_sid: "s".to_owned(),
            agent_session_id: None,
            delegation_edge_id: None,
        },
        exp: 0,
        started: std::time::Instant::now(),
        exchange_evidence: Some(Pending::settled(fate)),
    };
    let mut lost = governed(Err(EvidenceError::Lost));
    let refused = super::record(&state, &mut lost, &outcome)
        .await
        .unwrap_err();
    assert_eq!(
        (refused.status, refused.code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "audit_evidence_lost")
    );
    let mut kept = governed(Ok(()));
    super::record(&state, &mut kept, &outcome).await.unwrap();
}

/// A caller that hangs up mid-call (hyper then drops the handler's future) does not take the
/// call's evidence with it: the upstream was reached, so the call's event is recorded anyway.
#[tokio::test]
async fn a_caller_that_hangs_up_mid_call_still_leaves_the_calls_event() {
    let fixture = fixture().await;
    let token = fixture.mint().await;
    let request = fixture
        .request("GET", "/entries?slow=1", &token)
        .header("x-request-id", "hung-up")
        .body(Body::empty())
        .unwrap();
    let call = fixture.router.clone().oneshot(request);
    let patience = tokio::time::timeout(Duration::from_millis(400), call).await;
    if let Ok(answered) = patience {
        panic!(
            "the upstream answers after a second: {:?}",
            answered.map(|a| a.status())
        );
    }
    // The call's future is dropped here, in the middle of the upstream call (or, on a slow
    // machine, before it: the call must then still reach the upstream and be audited).
    let audited = || async {
        audit_events(&fixture.world.shared)
            .await
            .iter()
            .any(|event| {
                event["event_type"] == "gateway_resource_request"
                    && event["request_id"] == "hung-up"
            })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !audited().await {
        assert!(
            std::time::Instant::now() < deadline,
            "the call was cut short: no event"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fixture.last_seen().uri, "/api/entries?slow=1");
}
