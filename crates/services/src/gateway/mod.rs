//! The Gateway role: every path other than the probes is a governed call. A call passes, in
//! this order and all before any upstream contact: revocation freshness, the evidence latch,
//! the bearer (present, bounded, not about to expire), routing headers, zone and client
//! claims, path normalisation, the ES256 signature, the one-shot `jti`, the revocation anchors,
//! the STS circuit and the exchange. Then the upstream URL is checked, the credential is
//! injected, the request is proxied and the response streamed back, cut if the mandate is
//! revoked meanwhile. Each call that reached the exchange leaves one audit event, accepted
//! durably before the response is released.

pub mod exchange;
pub mod oauth;
pub mod revocation;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caracal_audit::Event;
use caracal_bus::ReplayNamespace;
use caracal_core::RequestId;
use caracal_store::now_ms;
use http::{HeaderMap, HeaderValue, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::evidence::Pending;
use crate::gateway_sts::{Exchanged, GatewayCall};
use crate::keys::KeyRing;
use crate::state::RoleState;
use crate::wire::{OAuthErrorBody, Upstream};
use exchange::{Admission, Circuit, Exchanger, Refusal};
use revocation::{Anchors, RevocationView};
use upstream::{CheckedResolver, GuardedBody};

/// The longest bearer accepted.
pub const MAX_BEARER_BYTES: usize = 4096;
/// A mandate expiring sooner than this is refused: it could lapse on its way upstream.
pub const PREFLIGHT_SECONDS: i64 = 35;
/// After a key-id miss forced a reload, the next forced reload of that zone waits this long.
const KEY_REFRESH_COOLDOWN: Duration = Duration::from_secs(30);

/// What an operator can tune; the defaults are the reference's.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// A revocation view not confirmed against the store for this long refuses everything.
    pub revocation_freshness: Duration,
    pub max_request_bytes: u64,
    /// How long the upstream may take to send its response head.
    pub upstream_timeout: Duration,
    /// How long a response body may go without a byte.
    pub stream_idle_timeout: Duration,
    /// When non-empty, the only upstream hosts dialled.
    pub host_allowlist: Vec<String>,
    /// Where the STS is when it does not run in this process.
    pub sts_url: String,
    pub sts_timeout: Duration,
}

impl GatewayConfig {
    pub fn new(sts_url: String) -> GatewayConfig {
        GatewayConfig {
            revocation_freshness: Duration::from_secs(70),
            max_request_bytes: 10 * 1024 * 1024,
            upstream_timeout: Duration::from_secs(30),
            stream_idle_timeout: Duration::from_secs(60),
            host_allowlist: Vec::new(),
            sts_url,
            sts_timeout: Duration::from_secs(5),
        }
    }
}

pub(crate) type UpstreamClient = Client<
    hyper_rustls::HttpsConnector<HttpConnector<CheckedResolver>>,
    http_body_util::Limited<axum::body::Body>,
>;

/// One Gateway replica's state.
pub struct Gateway {
    pub config: GatewayConfig,
    pub revocations: Arc<RevocationView>,
    pub circuit: Circuit,
    pub keys: KeyRing,
    exchanger: Exchanger,
    upstream: UpstreamClient,
    oauth_tokens: oauth::TokenCache,
    /// When each zone's keys were last reloaded because of an unknown key id.
    key_refreshes: Mutex<HashMap<String, Instant>>,
    pub metrics: Arc<GatewayMetrics>,
}

impl Gateway {
    pub fn new(
        config: GatewayConfig,
        exchanger: Exchanger,
        metrics: Arc<GatewayMetrics>,
    ) -> Result<Gateway, String> {
        Ok(Gateway {
            config,
            revocations: Arc::new(RevocationView::default()),
            circuit: Circuit::new(exchange::FAILURE_LIMIT, exchange::OPEN_FOR),
            keys: KeyRing::default(),
            exchanger,
            upstream: upstream_client()?,
            oauth_tokens: oauth::TokenCache::default(),
            key_refreshes: Mutex::default(),
            metrics,
        })
    }
}

/// The client for upstreams and providers' token endpoints: every address checked by the
/// guard's resolver, TLS verified against the Mozilla roots.
pub(crate) fn upstream_client() -> Result<UpstreamClient, String> {
    let mut connector = HttpConnector::new_with_resolver(CheckedResolver);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.set_keepalive(Some(Duration::from_secs(30)));
    connector.set_nodelay(true);
    connector.enforce_http(false);
    // TLS to https upstreams, verified against the Mozilla roots (webpki-roots), with the
    // aws-lc-rs provider named explicitly (no process-wide default is relied on).
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| format!("TLS configuration: {error}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Ok(Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(100)
        .build(connector))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub reason: String,
}

/// The Gateway role's own families (`caracal_gateway_*`).
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    pub requests: Counter,
    pub allowed: Counter,
    pub denials: Family<DenialLabels, Counter>,
    pub sts_exchange_errors: Counter,
    pub sts_circuit_opened: Counter,
    pub sts_circuit_fast_fail: Counter,
    pub sts_circuit_state: Gauge,
    pub upstream_errors: Counter,
    pub revocation_messages: Counter,
    pub revocation_reloads: Counter,
    pub revocation_reload_errors: Counter,
    pub revocation_snapshot_age_seconds: Gauge,
    pub revocation_stream_age_seconds: Gauge,
    pub revocation_snapshot_fresh: Gauge,
    pub revocation_propagation_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub revocations_active: Gauge,
    pub streams_revoked: Counter,
    pub provider_token_failures: Counter,
}

impl GatewayMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            ("requests", "Governed calls received", &self.requests),
            (
                "requests_allowed",
                "Governed calls proxied upstream",
                &self.allowed,
            ),
            (
                "sts_exchange_errors",
                "Exchanges that did not succeed (fast fails included)",
                &self.sts_exchange_errors,
            ),
            (
                "sts_circuit_opened",
                "Times the STS circuit opened",
                &self.sts_circuit_opened,
            ),
            (
                "sts_circuit_fast_fail",
                "Calls refused by the open STS circuit",
                &self.sts_circuit_fast_fail,
            ),
            (
                "upstream_errors",
                "Upstream transport and copy failures",
                &self.upstream_errors,
            ),
            (
                "revocation_messages",
                "caracal.sessions.revoke messages applied",
                &self.revocation_messages,
            ),
            (
                "revocation_reloads",
                "Revocation snapshots loaded",
                &self.revocation_reloads,
            ),
            (
                "revocation_reload_errors",
                "Revocation snapshots that failed to load",
                &self.revocation_reload_errors,
            ),
            (
                "streams_revoked",
                "Response streams cut because the mandate was revoked",
                &self.streams_revoked,
            ),
            (
                "provider_token_failures",
                "Client-credentials tokens that could not be fetched",
                &self.provider_token_failures,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "denials",
            "Governed calls refused by the Gateway, by reason",
            self.denials.clone(),
        );
        registry.register(
            "sts_circuit_state",
            "STS circuit: 0 closed, 1 open, 2 half-open",
            self.sts_circuit_state.clone(),
        );
        registry.register(
            "revocation_snapshot_age_seconds",
            "Seconds since the revocation view was confirmed against the store",
            self.revocation_snapshot_age_seconds.clone(),
        );
        registry.register(
            "revocation_stream_age_seconds",
            "Seconds since caracal.sessions.revoke was last read",
            self.revocation_stream_age_seconds.clone(),
        );
        registry.register(
            "revocation_snapshot_fresh",
            "1 while the revocation view is fresh (store and stream within the window), else 0",
            self.revocation_snapshot_fresh.clone(),
        );
        registry.register(
            "revocation_propagation_lag_seconds",
            "Age of the last revocation message when it was applied",
            self.revocation_propagation_lag_seconds.clone(),
        );
        registry.register(
            "revocations_active",
            "Anchors the revocation view holds",
            self.revocations_active.clone(),
        );
    }

    /// Refreshes the gauges computed from the Gateway's state.
    pub fn observe(&self, gateway: &Gateway) {
        let (view, now) = (&gateway.revocations, now_ms());
        self.revocation_snapshot_age_seconds
            .set(view.age_seconds(now).unwrap_or(i64::MAX / 2));
        self.revocation_stream_age_seconds
            .set(view.stream_age_seconds(now).unwrap_or(i64::MAX / 2));
        self.revocation_snapshot_fresh.set(i64::from(
            view.is_fresh(gateway.config.revocation_freshness, now),
        ));
        self.revocation_propagation_lag_seconds
            .set(view.propagation_lag_seconds());
        self.revocations_active
            .set(i64::try_from(view.active()).unwrap_or(i64::MAX));
        self.sts_circuit_state.set(gateway.circuit.state().gauge());
    }
}

/// Marks the Gateway's own refusals (never an upstream's answer, whose `x-caracal-*` headers are
/// dropped): a caller, `caracal incident validate` among them, can tell one from the other.
pub const REFUSED_BY: &str = "x-caracal-refused-by";

/// A refusal before the upstream: the error envelope of the token endpoint.
fn refuse(state: &RoleState, reason: &str, request_id: &str, refusal: Refusal) -> Response {
    if let Some(gateway) = &state.gateway {
        gateway
            .metrics
            .denials
            .get_or_create(&DenialLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
    let mut response = render(request_id, refusal);
    response
        .headers_mut()
        .insert(REFUSED_BY, HeaderValue::from_static("gateway"));
    response
}

fn render(request_id: &str, refusal: Refusal) -> Response {
    let retry = refusal.status == StatusCode::SERVICE_UNAVAILABLE;
    let body = OAuthErrorBody {
        error: refusal.code,
        error_description: refusal.description,
        request_id: request_id.to_owned(),
        extra: serde_json::Map::new(),
    };
    let mut response = (refusal.status, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    if retry {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn invalid(status: StatusCode, description: &str) -> Refusal {
    Refusal::new(status, "invalid_token", description)
}

/// The claims the Gateway reads before it verifies anything: only to refuse early and to
/// choose the zone's keys.
#[derive(serde::Deserialize)]
struct Peek {
    #[serde(default)]
    exp: i64,
    #[serde(default)]
    zone_id: String,
    #[serde(default)]
    client_id: String,
}

fn peek(token: &str) -> Option<Peek> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let claims: Peek = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    (claims.exp != 0).then_some(claims)
}

/// A path that could reach somewhere else once decoded: decoded repeatedly until stable, any
/// malformed escape, backslash, NUL, or `.`/`..` segment at any stage counts.
pub fn is_traversal(path: &str) -> bool {
    let mut current = path.to_owned();
    for _ in 0..8 {
        let bytes = current.as_bytes();
        let malformed = bytes.iter().enumerate().any(|(at, byte)| {
            *byte == b'%'
                && !(bytes.get(at + 1).is_some_and(u8::is_ascii_hexdigit)
                    && bytes.get(at + 2).is_some_and(u8::is_ascii_hexdigit))
        });
        if malformed
            || current.contains('\\')
            || current.contains('\0')
            || current
                .split('/')
                .any(|segment| segment == "." || segment == "..")
        {
            return true;
        }
        let Ok(decoded) = percent_encoding::percent_decode_str(&current).decode_utf8() else {
            return true;
        };
        if decoded == current {
            return false;
        }
        current = decoded.into_owned();
    }
    true
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// The governed call.
/// `POST /internal/revocations/reload` (an admin token that may write everywhere): reads the
/// revocation snapshot from the store now instead of at the next 30 s tick, so a replica whose
/// view went stale during an outage is fresh again as soon as the store is back. This path is
/// the Gateway's own, never proxied.
pub async fn reload_revocations(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
) -> Result<axum::Json<serde_json::Value>, crate::error::ApiError> {
    crate::auth::authenticate(&state, &headers)
        .await?
        .require(crate::auth::Access::Write, None)?;
    let gateway = state
        .gateway
        .clone()
        .ok_or_else(|| crate::error::ApiError::new(caracal_core::ErrorCode::InternalError))?;
    match gateway
        .revocations
        .reload(state.shared.store.as_ref())
        .await
    {
        Ok(anchors) => {
            gateway.metrics.revocation_reloads.inc();
            let fresh = gateway
                .revocations
                .is_fresh(gateway.config.revocation_freshness, now_ms());
            Ok(axum::Json(
                serde_json::json!({ "reloaded": true, "anchors": anchors, "fresh": fresh }),
            ))
        }
        Err(error) => {
            gateway.metrics.revocation_reload_errors.inc();
            Err(error.into())
        }
    }
}

pub async fn proxy(State(state): State<RoleState>, request: Request) -> Response {
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(ToString::to_string)
        .unwrap_or_default();
    let Some(gateway) = state.gateway.clone() else {
        return render(
            &request_id,
            internal(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        );
    };
    gateway.metrics.requests.inc();
    match checked(&state, &gateway, &request_id, request).await {
        Ok(response) => response,
        Err((reason, refusal)) => refuse(&state, reason, &request_id, refusal),
    }
}

type Denial = (&'static str, Refusal);

async fn checked(
    state: &RoleState,
    gateway: &Arc<Gateway>,
    request_id: &str,
    request: Request,
) -> Result<Response, Denial> {
    let now = now_ms();
    if !gateway
        .revocations
        .is_fresh(gateway.config.revocation_freshness, now)
    {
        return Err((
            "revocation_stale",
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "revocation_snapshot_stale",
                "revocation state unavailable",
            ),
        ));
    }
    if state.shared.evidence.is_lost() {
        return Err((
            "evidence_lost",
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_evidence_lost",
                "audit evidence was lost; protected traffic is refused",
            ),
        ));
    }
    let headers = request.headers();
    let token = match header(headers, "authorization") {
        Some(value) if value.len() > 7 && value[..7].eq_ignore_ascii_case("bearer ") => {
            value[7..].trim().to_owned()
        }
        _ => {
            return Err((
                "missing_auth",
                invalid(StatusCode::UNAUTHORIZED, "missing bearer token"),
            ));
        }
    };
    if token.is_empty() {
        return Err((
            "missing_auth",
            invalid(StatusCode::UNAUTHORIZED, "missing bearer token"),
        ));
    }
    if token.len() > MAX_BEARER_BYTES {
        return Err((
            "bad_bearer",
            invalid(StatusCode::UNAUTHORIZED, "bearer token too large"),
        ));
    }
    let Some(peeked) = peek(&token) else {
        return Err((
            "bad_bearer",
            invalid(StatusCode::UNAUTHORIZED, "malformed bearer token"),
        ));
    };
    if peeked.exp - now / 1000 < PREFLIGHT_SECONDS {
        return Err((
            "expiring",
            Refusal::new(
                StatusCode::UNAUTHORIZED,
                "credential_expired_not_renewable",
                "credential expiring within pre-flight window",
            ),
        ));
    }
    if headers.contains_key("x-caracal-client-id") {
        return Err((
            "bad_routing",
            invalid(
                StatusCode::BAD_REQUEST,
                "client identity derives from the bearer token",
            ),
        ));
    }
    let resource = header(headers, "x-caracal-resource")
        .map(str::trim)
        .unwrap_or_default()
        .to_owned();
    if resource.is_empty() {
        return Err((
            "bad_routing",
            invalid(StatusCode::BAD_REQUEST, "missing routing headers"),
        ));
    }
    if !caracal_core::is_plain_id(&peeked.zone_id) {
        return Err((
            "bad_routing",
            invalid(StatusCode::UNAUTHORIZED, "missing token zone"),
        ));
    }
    if !caracal_core::is_plain_id(&peeked.client_id) {
        return Err((
            "bad_routing",
            invalid(StatusCode::UNAUTHORIZED, "missing token client"),
        ));
    }
    if state.shared.containment.fail_closed(&peeked.zone_id) {
        return Err((
            "contained",
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "contained",
                "an incident containment refuses protected traffic",
            ),
        ));
    }
    let path = request.uri().path().to_owned();
    if is_traversal(&path) {
        return Err((
            "path_traversal",
            invalid(StatusCode::BAD_REQUEST, "path traversal not permitted"),
        ));
    }
    let hashed = crate::keys::Hashed::new(&token);
    let claims = verify(state, gateway, &peeked.zone_id, &hashed).await?;
    let fingerprint = hashed.fingerprint();
    let mut spent = false;
    if claims.use_ != "session" && !claims.jti.is_empty() {
        let ttl = claims.exp - now / 1000;
        let replay = &state.shared.bus.replay;
        if claims.iat.saturating_mul(1000) < replay.forgotten_before_ms(ReplayNamespace::GatewayJti)
        {
            // An earlier process may have accepted it, and its claims are gone with it.
            return Err((
                "jti_replay",
                invalid(
                    StatusCode::UNAUTHORIZED,
                    "mandate issued before the gateway restarted; mint a new one",
                ),
            ));
        }
        if ttl > 0 {
            let ttl = Duration::from_secs(u64::try_from(ttl).unwrap_or(0));
            match state
                .shared
                .bus
                .replay
                .claim_once(ReplayNamespace::GatewayJti, &claims.jti, ttl)
                .await
            {
                Ok(true) => spent = true,
                Ok(false) => {
                    replay_detected(state, request_id, &claims, &resource, &fingerprint).await;
                    return Err((
                        "jti_replay",
                        invalid(StatusCode::UNAUTHORIZED, "token replay detected"),
                    ));
                }
                Err(error) => {
                    tracing::warn!(%error, "replay registry unavailable: call refused");
                    return Err((
                        "jti_replay",
                        Refusal::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "sts_unavailable",
                            "replay registry unavailable",
                        ),
                    ));
                }
            }
        }
    }
    let anchors = Anchors {
        sid: claims.sid.clone(),
        root_sid: claims.root_sid.clone(),
        agent_session_id: claims.agent_session_id.clone(),
        delegation_edge_id: claims.delegation_edge_id.clone(),
    };
    if gateway.revocations.is_revoked(&anchors) {
        tracing::info!(sid = %anchors.sid, root_sid = %anchors.root_sid, agent_session_id = ?anchors.agent_session_id, delegation_edge_id = ?anchors.delegation_edge_id, "revoked mandate refused");
        return Err((
            "revoked",
            invalid(StatusCode::UNAUTHORIZED, "session revoked"),
        ));
    }
    let admission = gateway.circuit.admit();
    if admission == Admission::Refused {
        gateway.metrics.sts_exchange_errors.inc();
        gateway.metrics.sts_circuit_fast_fail.inc();
        return Err((
            "sts_circuit_open",
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "sts_unavailable",
                "sts unavailable",
            ),
        ));
    }
    // The claims go to the in-process STS (when spent here); the call keeps what it needs.
    let (sub_type, exp) = (claims.sub_type.clone(), claims.exp);
    let call = GatewayCall {
        zone_id: peeked.zone_id.clone(),
        application_id: peeked.client_id.clone(),
        token,
        resource: resource.clone(),
        method: request.method().as_str().to_owned(),
        path: path.clone(),
        verified: spent.then_some(claims),
    };
    let exchanged = gateway.exchanger.exchange(state, request_id, &call).await;
    if gateway
        .circuit
        .record(admission, exchanged.as_ref().map(|_| ()))
    {
        gateway.metrics.sts_circuit_opened.inc();
        tracing::warn!("STS circuit opened: protected calls are refused until a probe succeeds");
    }
    let Exchanged { answer, evidence } = exchanged.map_err(|refusal| {
        gateway.metrics.sts_exchange_errors.inc();
        ("sts_exchange", refusal)
    })?;
    let Some(directive) = answer
        .upstreams
        .as_ref()
        .and_then(|upstreams| upstreams.get(&resource))
        .filter(|directive| !directive.url.is_empty())
        .cloned()
    else {
        if let Some(evidence) = evidence {
            evidence
                .durable()
                .await
                .map_err(|error| ("evidence", evidence_refusal(error)))?;
        }
        return Err((
            "no_upstream",
            Refusal::new(
                StatusCode::FORBIDDEN,
                "access_denied",
                "resource upstream not configured",
            ),
        ));
    };
    let call = Governed {
        request_id: request_id.to_owned(),
        zone_id: peeked.zone_id,
        application_id: peeked.client_id,
        resource,
        method: call.method,
        fingerprint,
        sub_type,
        anchors,
        exp,
        started: Instant::now(),
        exchange_evidence: evidence,
    };
    Ok(dispatch(
        state,
        gateway,
        call,
        directive,
        answer.access_token,
        request,
    )
    .await)
}

/// Verifies the mandate's signature with its zone's keys. An unknown key id reloads the
/// zone's keys once (a rotation may be newer than the cache), at most every
/// [`KEY_REFRESH_COOLDOWN`]; keys that cannot be read refuse the call.
async fn verify(
    state: &RoleState,
    gateway: &Gateway,
    zone_id: &str,
    token: &crate::keys::Hashed<'_>,
) -> Result<crate::wire::MandateClaims, Denial> {
    let bad = || {
        (
            "signature",
            invalid(StatusCode::UNAUTHORIZED, "bearer signature invalid"),
        )
    };
    let unavailable = |error: crate::keys::KeyError| {
        tracing::warn!(%error, zone = zone_id, "zone keys unavailable: call refused");
        (
            "keys_unavailable",
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "sts_unavailable",
                "signing keys unavailable",
            ),
        )
    };
    let store = state.shared.store.as_ref();
    let kek = &state.shared.kek;
    let keys = match gateway.keys.zone(store, kek, zone_id).await {
        Ok(keys) => keys,
        Err(crate::keys::KeyError::NoKey(_)) => return Err(bad()),
        Err(error) => return Err(unavailable(error)),
    };
    let now = now_ms();
    match keys.verify_hashed(token, now) {
        Ok(claims) => Ok(claims),
        Err(crate::mandate::MandateError::UnknownKey) => {
            let may_refresh = {
                let mut refreshes = gateway
                    .key_refreshes
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let due = refreshes
                    .get(zone_id)
                    .is_none_or(|at| at.elapsed() >= KEY_REFRESH_COOLDOWN);
                if due {
                    refreshes.insert(zone_id.to_owned(), Instant::now());
                }
                due
            };
            if !may_refresh {
                return Err(bad());
            }
            gateway.keys.flush(zone_id);
            let keys = gateway
                .keys
                .zone(store, kek, zone_id)
                .await
                .map_err(unavailable)?;
            keys.verify_hashed(token, now).map_err(|_| bad())
        }
        Err(_) => Err(bad()),
    }
}

/// A call that passed every check: what its audit event and response guard need.
struct Governed {
    request_id: String,
    zone_id: String,
    application_id: String,
    resource: String,
    method: String,
    /// The first 8 bytes of the mandate's SHA-256, in hex: correlates calls without keeping
    /// tokens.
    fingerprint: String,
    sub_type: String,
    anchors: Anchors,
    exp: i64,
    started: Instant,
    /// The re-exchange's event, when the in-process STS left its durability to this call.
    exchange_evidence: Option<Pending>,
}

/// What one governed call's audit event says beyond the ids.
struct Outcome<'a> {
    evaluation_status: &'static str,
    gateway_status: u16,
    upstream_status: Option<u16>,
    upstream_host: Option<&'a str>,
    auth_mode: Option<&'a str>,
    provider_id: Option<&'a str>,
    /// The provider connection whose token was injected (authorization-code providers).
    connection_id: Option<&'a str>,
    /// The upstream's declared `Content-Length` (absent when it streams without one): the event
    /// is accepted before the first byte reaches the caller (invariant 5), so it cannot count
    /// what the body turns out to be.
    response_bytes: Option<u64>,
    error_kind: Option<&'static str>,
}

fn gateway_event(call: &Governed, outcome: &Outcome<'_>) -> Event {
    let result_class = outcome.upstream_status.map(|status| match status {
        200..=299 => "success",
        300..=399 => "redirect",
        400..=499 => "client_error",
        500..=599 => "server_error",
        _ => "unknown",
    });
    let mut metadata = serde_json::json!({
        "application_id": call.application_id,
        "resource": call.resource,
        "subject_fingerprint": call.fingerprint,
        "method": call.method,
        "gateway_status": outcome.gateway_status,
        "latency_ms": u64::try_from(call.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "response_bytes": outcome.response_bytes,
        "subject_kind": if call.sub_type == "application" { "application" } else { "user" },
        "agent_session_id": call.anchors.agent_session_id,
        "delegation_edge_id": call.anchors.delegation_edge_id,
    });
    if let Some(fields) = metadata.as_object_mut() {
        let optional = [
            (
                "upstream_host",
                outcome.upstream_host.map(serde_json::Value::from),
            ),
            ("auth_mode", outcome.auth_mode.map(serde_json::Value::from)),
            (
                "provider_id",
                outcome.provider_id.map(serde_json::Value::from),
            ),
            (
                "connection_id",
                outcome.connection_id.map(serde_json::Value::from),
            ),
            (
                "upstream_status",
                outcome.upstream_status.map(serde_json::Value::from),
            ),
            ("result_class", result_class.map(serde_json::Value::from)),
            (
                "error_kind",
                outcome.error_kind.map(serde_json::Value::from),
            ),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                fields.insert(name.to_owned(), value);
            }
        }
    }
    Event {
        id: uuid::Uuid::now_v7().to_string(),
        zone_id: call.zone_id.clone(),
        event_type: "gateway_resource_request".to_owned(),
        request_id: call.request_id.clone(),
        decision: "allow".to_owned(),
        policy_set_id: None,
        policy_set_version_id: None,
        manifest_sha: None,
        evaluation_status: outcome.evaluation_status.to_owned(),
        determining_policies_json: serde_json::json!([]),
        diagnostics_json: serde_json::json!([]),
        metadata_json: metadata,
        occurred_at_ms: now_ms(),
    }
}

/// A replayed mandate is an anomaly worth its own event (nothing else before the exchange is).
async fn replay_detected(
    state: &RoleState,
    request_id: &str,
    claims: &crate::wire::MandateClaims,
    resource: &str,
    fingerprint: &str,
) {
    let event = Event {
        id: uuid::Uuid::now_v7().to_string(),
        zone_id: claims.zone_id.clone(),
        event_type: "replay_detected".to_owned(),
        request_id: request_id.to_owned(),
        decision: "deny".to_owned(),
        policy_set_id: None,
        policy_set_version_id: None,
        manifest_sha: None,
        evaluation_status: "anomaly".to_owned(),
        determining_policies_json: serde_json::json!([]),
        diagnostics_json: serde_json::json!([]),
        metadata_json: serde_json::json!({
            "jti": claims.jti,
            "resource": resource,
            "client_id": claims.client_id,
            "subject_fingerprint": fingerprint,
            "request_id": request_id,
        }),
        occurred_at_ms: now_ms(),
    };
    if let Err(error) = state.shared.evidence.record(event).await {
        tracing::warn!(%error, "the replay_detected event could not be recorded");
    }
}

/// Records the call's event (and waits for the re-exchange's); a call whose evidence cannot be
/// recorded is not reported.
async fn record(
    state: &RoleState,
    call: &mut Governed,
    outcome: &Outcome<'_>,
) -> Result<(), Refusal> {
    let exchange = call.exchange_evidence.take();
    let exchange = async {
        match exchange {
            Some(pending) => pending.durable().await,
            None => Ok(()),
        }
    };
    let own = state.shared.evidence.record(gateway_event(call, outcome));
    let (own, exchange) = tokio::join!(own, exchange);
    own.and(exchange).map_err(evidence_refusal)
}

fn evidence_refusal(error: crate::evidence::EvidenceError) -> Refusal {
    let code = crate::api::evidence_error(error).code;
    Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        code.as_str(),
        "audit evidence could not be recorded",
    )
}

/// Audits a failure after the exchange and renders it (or the evidence failure instead).
async fn failed(
    state: &RoleState,
    call: &mut Governed,
    directive: &Upstream,
    host: Option<&str>,
    refusal: Refusal,
    evaluation_status: &'static str,
    error_kind: &'static str,
) -> Response {
    let outcome = Outcome {
        evaluation_status,
        gateway_status: refusal.status.as_u16(),
        upstream_status: None,
        upstream_host: host,
        auth_mode: Some(&directive.auth_mode),
        provider_id: directive.provider_id.as_deref(),
        connection_id: directive.connection_id.as_deref(),
        response_bytes: None,
        error_kind: Some(error_kind),
    };
    match record(state, call, &outcome).await {
        Ok(()) => render(&call.request_id, refusal),
        Err(evidence) => render(&call.request_id, evidence),
    }
}

fn internal(status: StatusCode, description: &str) -> Refusal {
    Refusal::new(status, "internal_error", description)
}

/// Sends the call upstream with the directive's credential and streams the answer back.
async fn dispatch(
    state: &RoleState,
    gateway: &Arc<Gateway>,
    mut call: Governed,
    directive: Upstream,
    resource_mandate: String,
    request: Request,
) -> Response {
    let base = match upstream::check_url(&directive.url, &gateway.config.host_allowlist).await {
        Ok(base) => base,
        Err(error) => {
            tracing::warn!(%error, resource = %call.resource, "upstream refused by the address guard");
            return failed(
                state,
                &mut call,
                &directive,
                None,
                internal(StatusCode::BAD_GATEWAY, "upstream not addressable"),
                "upstream_rejected",
                "upstream_not_addressable",
            )
            .await;
        }
    };
    let host = base.host().unwrap_or_default().to_owned();
    if let Some(hosts) = directive
        .allowed_token_hosts
        .as_ref()
        .filter(|hosts| !hosts.is_empty())
        && !hosts
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(&host))
    {
        return failed(
            state,
            &mut call,
            &directive,
            Some(&host),
            internal(
                StatusCode::BAD_GATEWAY,
                "provider credential not allowed for upstream host",
            ),
            "upstream_rejected",
            "provider_host_not_allowed",
        )
        .await;
    }
    let declared_length = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > gateway.config.max_request_bytes) {
        return failed(
            state,
            &mut call,
            &directive,
            Some(&host),
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body too large",
            ),
            "build_failed",
            "request_too_large",
        )
        .await;
    }
    let mut directive = directive;
    if directive.auth_mode == "provider_oauth" && directive.token_url.is_some() {
        match gateway
            .oauth_tokens
            .token(
                &gateway.upstream,
                &directive,
                &gateway.config.host_allowlist,
            )
            .await
        {
            Ok(token) => {
                directive.provider_token = Some(token);
            }
            Err(error) => {
                tracing::warn!(%error, resource = %call.resource, "provider token unavailable");
                gateway.metrics.provider_token_failures.inc();
                return failed(
                    state,
                    &mut call,
                    &directive,
                    Some(&host),
                    Refusal::new(
                        StatusCode::BAD_GATEWAY,
                        "http_request_failed",
                        "provider credential unavailable",
                    ),
                    "upstream_error",
                    "provider_token_failed",
                )
                .await;
            }
        }
    }
    let (parts, body) = request.into_parts();
    let outbound = match build_request(
        gateway,
        &call,
        &directive,
        &resource_mandate,
        &base,
        &parts,
        body,
    ) {
        Ok(outbound) => outbound,
        Err(description) => {
            return failed(
                state,
                &mut call,
                &directive,
                Some(&host),
                internal(StatusCode::BAD_REQUEST, description),
                "build_failed",
                "request_build_failed",
            )
            .await;
        }
    };
    let sent = tokio::time::timeout(
        gateway.config.upstream_timeout,
        gateway.upstream.request(outbound),
    )
    .await;
    let response = match sent {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            gateway.metrics.upstream_errors.inc();
            let too_large = std::error::Error::source(&error)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>())
                || format!("{error:?}").contains("LengthLimitError");
            tracing::warn!(error = %std::error::Error::source(&error).map(ToString::to_string).unwrap_or_else(|| error.to_string()), "upstream call failed");
            let refusal = if too_large {
                Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "request body too large",
                )
            } else {
                internal(StatusCode::BAD_GATEWAY, "upstream unreachable")
            };
            return failed(
                state,
                &mut call,
                &directive,
                Some(&host),
                refusal,
                "upstream_error",
                "transport_error",
            )
            .await;
        }
        Err(_) => {
            gateway.metrics.upstream_errors.inc();
            return failed(
                state,
                &mut call,
                &directive,
                Some(&host),
                internal(StatusCode::GATEWAY_TIMEOUT, "upstream timeout"),
                "upstream_error",
                "transport_error",
            )
            .await;
        }
    };
    let (mut head, incoming) = response.into_parts();
    let length = head
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let outcome = Outcome {
        evaluation_status: "executed",
        gateway_status: head.status.as_u16(),
        upstream_status: Some(head.status.as_u16()),
        upstream_host: Some(&host),
        auth_mode: Some(&directive.auth_mode),
        provider_id: directive.provider_id.as_deref(),
        connection_id: directive.connection_id.as_deref(),
        response_bytes: length,
        error_kind: None,
    };
    // Invariant 5: the event is accepted before the caller learns anything of the result.
    if let Err(evidence) = record(state, &mut call, &outcome).await {
        return render(&call.request_id, evidence);
    }
    gateway.metrics.allowed.inc();
    upstream::sanitise_response_headers(&mut head.headers);
    let expires_in = (call.exp - now_ms() / 1000).max(0);
    head.headers
        .insert("x-caracal-token-expires-in", HeaderValue::from(expires_in));
    head.headers.insert(
        http::header::TRAILER,
        HeaderValue::from_static("X-Caracal-Revoked"),
    );
    head.headers.insert(
        "x-request-id",
        HeaderValue::from_str(&call.request_id).unwrap_or(HeaderValue::from_static("")),
    );
    let revoked = Arc::new(AtomicBool::new(false));
    let body = GuardedBody::new(
        incoming,
        Arc::clone(&gateway.revocations),
        call.anchors.clone(),
        gateway.config.stream_idle_timeout,
        Arc::new(AtomicU64::new(0)),
        Arc::clone(&revoked),
    );
    // Once the stream ends, count a cut (the event above already holds the call).
    let metrics = Arc::clone(&gateway.metrics);
    let body = http_body_util::BodyExt::map_frame(body, move |frame| {
        if frame.is_trailers() && revoked.load(Ordering::Relaxed) {
            metrics.streams_revoked.inc();
        }
        frame
    });
    Response::from_parts(head, Body::new(body))
}

/// The request the upstream receives.
fn build_request(
    gateway: &Gateway,
    call: &Governed,
    directive: &Upstream,
    resource_mandate: &str,
    base: &http::Uri,
    parts: &http::request::Parts,
    body: Body,
) -> Result<http::Request<http_body_util::Limited<Body>>, &'static str> {
    // The in-process STS mints no mandate for a directive that does not carry one; a directive
    // that does and came without one is refused, never sent with an empty credential.
    if directive.carries_mandate() && resource_mandate.is_empty() {
        return Err("upstream request build failed");
    }
    let credential_header = upstream::credential_header(directive.auth_header.as_deref())
        .ok_or("upstream request build failed")?;
    let mut headers = upstream::sanitise_request_headers(&parts.headers);
    headers.remove(&credential_header);
    let secret = directive.provider_token.as_deref().unwrap_or_default();
    let with_scheme =
        |scheme: Option<&str>, value: &str| match scheme.filter(|scheme| !scheme.is_empty()) {
            Some(scheme) => format!("{scheme} {value}"),
            None => value.to_owned(),
        };
    let mut query_credential = None;
    let credential = match directive.auth_mode.as_str() {
        "none" => None,
        "caracal_jwt" => Some(with_scheme(
            directive.auth_scheme.as_deref().or(Some("Bearer")),
            resource_mandate,
        )),
        "provider_apikey" if directive.auth_location.as_deref() == Some("query") => {
            let name = directive
                .query_param_name
                .as_deref()
                .filter(|name| !name.is_empty())
                .ok_or("upstream request build failed")?;
            if secret.is_empty() {
                return Err("upstream request build failed");
            }
            query_credential = Some((name, secret));
            None
        }
        "provider_apikey" | "provider_oauth" => {
            if secret.is_empty() {
                return Err("upstream request build failed");
            }
            Some(with_scheme(directive.auth_scheme.as_deref(), secret))
        }
        _ => return Err("upstream request build failed"),
    };
    if let Some(credential) = credential {
        let value =
            HeaderValue::from_str(&credential).map_err(|_| "upstream request build failed")?;
        headers.insert(credential_header, value);
    }
    if directive.forward_caracal_identity
        && matches!(
            directive.auth_mode.as_str(),
            "provider_apikey" | "provider_oauth"
        )
    {
        let value =
            HeaderValue::from_str(resource_mandate).map_err(|_| "upstream request build failed")?;
        headers.insert("x-caracal-identity", value);
    }
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip().to_string());
    if let Some(peer) = peer.and_then(|peer| HeaderValue::from_str(&peer).ok()) {
        headers.insert("x-forwarded-for", peer);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(host) = parts.headers.get(http::header::HOST) {
        headers.insert("x-forwarded-host", host.clone());
    }
    if let Ok(id) = HeaderValue::from_str(&call.request_id) {
        headers.insert("x-request-id", id);
    }
    if !headers.contains_key("traceparent")
        && let Ok(ids) = caracal_crypto::random_bytes::<24>()
    {
        let hex = caracal_crypto::hex(&ids);
        if let Ok(value) = HeaderValue::from_str(&format!("00-{}-{}-01", &hex[..32], &hex[32..])) {
            headers.insert("traceparent", value);
        }
    }
    let path = upstream::join_path(base.path(), parts.uri.path());
    let query = upstream::merge_query(base.query(), parts.uri.query(), query_credential);
    let authority = base.authority().ok_or("upstream request build failed")?;
    let scheme = base.scheme_str().unwrap_or("http");
    let uri = match query {
        Some(query) => format!("{scheme}://{authority}{path}?{query}"),
        None => format!("{scheme}://{authority}{path}"),
    };
    let mut outbound = http::Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .body(http_body_util::Limited::new(
            body,
            usize::try_from(gateway.config.max_request_bytes).unwrap_or(usize::MAX),
        ))
        .map_err(|_| "upstream request build failed")?;
    *outbound.headers_mut() = headers;
    Ok(outbound)
}

/// The Gateway's readiness: its revocation view must be fresh (store and stream), and an STS in another process
/// must answer its health probe.
pub async fn readiness(state: &RoleState) -> Vec<caracal_core::Check> {
    use caracal_core::Check;
    let Some(gateway) = state.gateway.as_ref() else {
        return Vec::new();
    };
    let mut checks = vec![if gateway
        .revocations
        .is_fresh(gateway.config.revocation_freshness, now_ms())
    {
        Check::pass("revocation")
    } else {
        Check::fail("revocation", "revocation_snapshot_stale")
    }];
    if let Exchanger::Remote(remote) = &gateway.exchanger {
        checks.push(if remote.healthy().await {
            Check::pass("sts")
        } else {
            Check::fail("sts", "sts_unreachable")
        });
    }
    checks
}

#[cfg(test)]
mod tests;
