//! The Gateway's exchange with the STS, behind a circuit breaker: in-process when the STS runs
//! in this process, otherwise an HMAC-signed `POST /oauth/2/token` over a pooled keep-alive
//! client. Every outcome is classified once into what the caller is told and whether it counts
//! toward opening the circuit.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

pub use crate::gateway_sts::Refusal;
use crate::gateway_sts::{
    ACCESS_TOKEN, Exchanged, GatewayCall, InProcessExchange, NONCE_HEADER, SIGNATURE_HEADER,
    TIMESTAMP_HEADER, TOKEN_EXCHANGE,
};
use crate::state::RoleState;
use crate::wire::TokenResponse;

/// Failures in a row that open the circuit.
pub const FAILURE_LIMIT: u32 = 3;
/// How long an open circuit refuses before one probe may try.
pub const OPEN_FOR: Duration = Duration::from_secs(10);
/// The STS's answer body is read up to this size.
const MAX_ANSWER_BYTES: usize = 16 * 1024;

fn unavailable(status: StatusCode, description: &str) -> Refusal {
    Refusal::new(status, "sts_unavailable", description)
}

/// `closed` → (failures) → `open` → (after [`OPEN_FOR`]) `half_open`: one probe goes through;
/// its success closes the circuit, its failure opens it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    /// The value of `caracal_gateway_sts_circuit_state`.
    pub fn gauge(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
struct CircuitInner {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

#[derive(Debug)]
pub struct Circuit {
    inner: Mutex<CircuitInner>,
    failure_limit: u32,
    open_for: Duration,
}

/// Whether a call may go to the STS; a probe must report back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Call,
    Probe,
    Refused,
}

impl Circuit {
    pub fn new(failure_limit: u32, open_for: Duration) -> Circuit {
        Circuit {
            inner: Mutex::new(CircuitInner {
                failures: 0,
                open_until: None,
                probing: false,
            }),
            failure_limit: failure_limit.max(1),
            open_for,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CircuitInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn state(&self) -> CircuitState {
        let inner = self.lock();
        match inner.open_until {
            None => CircuitState::Closed,
            Some(until) if Instant::now() < until => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }

    pub fn admit(&self) -> Admission {
        let mut inner = self.lock();
        match inner.open_until {
            None => Admission::Call,
            Some(until) if Instant::now() < until => Admission::Refused,
            Some(_) if inner.probing => Admission::Refused,
            Some(_) => {
                inner.probing = true;
                Admission::Probe
            }
        }
    }

    /// Records an exchange's outcome; `true` if this opened the circuit.
    pub fn record(&self, admission: Admission, outcome: Result<(), &Refusal>) -> bool {
        let mut inner = self.lock();
        if admission == Admission::Probe {
            inner.probing = false;
        }
        match outcome {
            Ok(()) => {
                inner.failures = 0;
                inner.open_until = None;
                false
            }
            Err(refusal) if refusal.counts_against_sts() => {
                inner.failures = inner.failures.saturating_add(1);
                let was_closed = inner.open_until.is_none();
                if admission == Admission::Probe || inner.failures >= self.failure_limit {
                    inner.open_until = Some(Instant::now() + self.open_for);
                    return was_closed || admission == Admission::Probe;
                }
                false
            }
            // A policy answer proves the STS is up: a probe that gets one closes the circuit.
            Err(_) => {
                if admission == Admission::Probe {
                    inner.failures = 0;
                    inner.open_until = None;
                }
                false
            }
        }
    }
}

/// Where the exchange goes.
pub enum Exchanger {
    InProcess(Arc<dyn InProcessExchange>),
    Remote(Box<RemoteSts>),
}

/// The STS over HTTP: `POST {base}/oauth/2/token`, signed with the KEK-derived key.
pub struct RemoteSts {
    pub token_url: http::Uri,
    pub health_url: http::Uri,
    pub key: [u8; 32],
    pub client: Client<HttpConnector, Full<Bytes>>,
    pub timeout: Duration,
}

impl RemoteSts {
    pub fn new(base_url: &str, key: [u8; 32], timeout: Duration) -> Result<RemoteSts, String> {
        let token_url: http::Uri = format!("{}/oauth/2/token", base_url.trim_end_matches('/'))
            .parse()
            .map_err(|error| format!("the STS URL `{base_url}` is not a URL: {error}"))?;
        if token_url.scheme_str() != Some("http") {
            return Err(format!(
                "the STS URL `{base_url}` must be http:// (put TLS in front of both roles)"
            ));
        }
        let health_url: http::Uri = format!("{}/health", base_url.trim_end_matches('/'))
            .parse()
            .map_err(|error| format!("the STS URL `{base_url}` is not a URL: {error}"))?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(crate::serve::IDLE_CLIENT_CONNECTION)
            .build(connector);
        Ok(RemoteSts {
            token_url,
            health_url,
            key,
            client,
            timeout,
        })
    }

    /// `GET {base}/health` answers 2xx within two seconds.
    pub async fn healthy(&self) -> bool {
        let Ok(request) = http::Request::get(self.health_url.clone()).body(Full::new(Bytes::new()))
        else {
            return false;
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), self.client.request(request)).await,
            Ok(Ok(response)) if response.status().is_success()
        )
    }

    async fn exchange(
        &self,
        request_id: &str,
        call: &GatewayCall,
    ) -> Result<TokenResponse, Refusal> {
        let mut pairs: Vec<(&str, &str)> = vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("zone_id", &call.zone_id),
            ("application_id", &call.application_id),
            ("subject_token", &call.token),
            ("subject_token_type", ACCESS_TOKEN),
            ("resource", &call.resource),
            ("request_method", &call.method),
            ("request_path", &call.path),
        ];
        pairs.push(("gateway_request_id", request_id));
        let body = serde_urlencoded::to_string(&pairs).map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid_token",
                "unencodable exchange",
            )
        })?;
        let timestamp = (caracal_store::now_ms() / 1000).to_string();
        let nonce = caracal_crypto::random_bytes::<32>()
            .map(|bytes| caracal_crypto::hex(&bytes))
            .map_err(|_| unavailable(StatusCode::SERVICE_UNAVAILABLE, "no randomness"))?;
        let signature = crate::gateway_sts::signature(
            &self.key,
            &timestamp,
            &nonce,
            "POST",
            self.token_url.path(),
            body.as_bytes(),
        );
        let request = http::Request::post(self.token_url.clone())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "caracal-gateway")
            .header("x-request-id", request_id)
            .header(TIMESTAMP_HEADER, timestamp)
            .header(NONCE_HEADER, nonce)
            .header(SIGNATURE_HEADER, signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| unavailable(StatusCode::BAD_GATEWAY, "sts unavailable"))?;
        let answered = tokio::time::timeout(self.timeout, async {
            let response = self.client.request(request).await.map_err(|error| {
                tracing::warn!(%error, "STS exchange failed in transport");
                unavailable(StatusCode::BAD_GATEWAY, "sts unavailable")
            })?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|_| unavailable(StatusCode::BAD_GATEWAY, "sts response invalid"))?
                .to_bytes();
            Ok::<_, Refusal>((parts, body))
        })
        .await
        .map_err(|_| unavailable(StatusCode::GATEWAY_TIMEOUT, "sts timeout"))??;
        let (parts, body) = answered;
        if parts.status != StatusCode::OK {
            #[derive(serde::Deserialize)]
            struct ErrorBody {
                error: String,
                #[serde(default)]
                error_description: String,
            }
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(error) if !error.error.is_empty() => Refusal {
                    status: parts.status,
                    code: error.error,
                    description: error.error_description,
                },
                _ => unavailable(
                    parts.status,
                    parts.status.canonical_reason().unwrap_or("sts error"),
                ),
            });
        }
        let json = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|kind| {
                let kind = kind.split(';').next().unwrap_or_default().trim();
                kind.eq_ignore_ascii_case("application/json") || kind.ends_with("+json")
            });
        match serde_json::from_slice::<TokenResponse>(&body) {
            Ok(answer) if json && !answer.access_token.is_empty() => Ok(answer),
            _ => Err(unavailable(StatusCode::BAD_GATEWAY, "sts response invalid")),
        }
    }
}

impl Exchanger {
    pub async fn exchange(
        &self,
        state: &RoleState,
        request_id: &str,
        call: &GatewayCall,
    ) -> Result<Exchanged, Refusal> {
        match self {
            Exchanger::InProcess(sts) => sts.exchange(state, request_id, call).await,
            Exchanger::Remote(remote) => Ok(Exchanged {
                answer: remote.exchange(request_id, call).await?,
                evidence: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down() -> Refusal {
        unavailable(StatusCode::BAD_GATEWAY, "sts unavailable")
    }

    #[test]
    fn the_circuit_opens_after_repeated_unavailability_and_one_probe_decides() {
        let circuit = Circuit::new(3, Duration::from_millis(50));
        let denied = Refusal::new(StatusCode::FORBIDDEN, "access_denied", "policy denied");
        for _ in 0..5 {
            assert!(!circuit.record(Admission::Call, Err(&denied)));
        }
        assert_eq!(
            circuit.state(),
            CircuitState::Closed,
            "policy answers never count"
        );
        assert!(!circuit.record(Admission::Call, Err(&down())));
        assert!(!circuit.record(Admission::Call, Err(&down())));
        assert!(
            circuit.record(Admission::Call, Err(&down())),
            "the third opens it"
        );
        assert_eq!(circuit.state(), CircuitState::Open);
        assert_eq!(circuit.admit(), Admission::Refused);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(circuit.state(), CircuitState::HalfOpen);
        assert_eq!(circuit.admit(), Admission::Probe);
        assert_eq!(circuit.admit(), Admission::Refused, "one probe at a time");
        assert!(
            circuit.record(Admission::Probe, Err(&down())),
            "a failed probe reopens"
        );
        assert_eq!(circuit.state(), CircuitState::Open);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(circuit.admit(), Admission::Probe);
        circuit.record(Admission::Probe, Ok(()));
        assert_eq!(circuit.state(), CircuitState::Closed);
        assert_eq!(circuit.admit(), Admission::Call);
    }

    #[test]
    fn cancelled_clients_and_provider_failures_do_not_count() {
        assert!(
            !Refusal::new(StatusCode::BAD_GATEWAY, "http_request_failed", "x").counts_against_sts()
        );
        assert!(
            !Refusal::new(StatusCode::from_u16(499).unwrap(), "sts_unavailable", "x")
                .counts_against_sts()
        );
        assert!(
            Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "sts_unavailable", "x")
                .counts_against_sts()
        );
    }
}
