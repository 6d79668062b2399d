//! The client side of the roles' probes: another role's `/health`, `/ready` or `/metrics` over
//! HTTP, bounded in time. `caracal status`, `incident validate`, `incident preserve` and the
//! console's overview all read the roles through here, so they agree on what "ready" means;
//! the last two judge recovery from one `survey`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::wire::ReadyBody;

/// A role that does not answer within this bound counts as not answering.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// An HTTP client for the probes, with the bearer `/metrics` needs when one is configured.
#[derive(Clone)]
pub struct Client {
    http: hyper_util::client::legacy::Client<HttpConnector, Empty<Bytes>>,
    metrics_bearer: Option<std::sync::Arc<str>>,
}

pub fn client() -> Client {
    Client {
        http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(crate::serve::IDLE_CLIENT_CONNECTION)
            .build_http(),
        metrics_bearer: None,
    }
}

impl Client {
    /// This client, presenting `bearer` (if any) to `/metrics`.
    #[must_use]
    pub fn with_metrics_bearer(mut self, bearer: Option<std::sync::Arc<str>>) -> Client {
        self.metrics_bearer = bearer;
        self
    }
}

/// `GET http://{address}{path}`: the status and body, or why there is none (`unreachable`,
/// `timeout`, `bad_address`). A role bound to every interface is asked on loopback.
pub async fn get(
    client: &Client,
    address: SocketAddr,
    path: &str,
) -> Result<(u16, Bytes), &'static str> {
    let mut address = address;
    if address.ip().is_unspecified() {
        address.set_ip(Ipv4Addr::LOCALHOST.into());
    }
    let uri: hyper::Uri = format!("http://{address}{path}")
        .parse()
        .map_err(|_| "bad_address")?;
    let mut request = hyper::Request::get(uri);
    if let Some(bearer) = client
        .metrics_bearer
        .as_deref()
        .filter(|_| path == "/metrics")
    {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {bearer}"));
    }
    let request = request.body(Empty::new()).map_err(|_| "bad_address")?;
    let exchange = async {
        let response = client
            .http
            .request(request)
            .await
            .map_err(|_| "unreachable")?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|_| "unreachable")?;
        Ok((status, body.to_bytes()))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| "timeout")?
}

/// What a role's `/ready` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// 200 with `status: ready`.
    pub ready: bool,
    /// The first failed check's reason, or why there was no usable answer.
    pub reason: Option<String>,
    /// Every failed check, as (name, reason).
    pub failed: Vec<(String, String)>,
    /// Whether the role answered at all.
    pub answered: bool,
}

pub async fn ready(client: &Client, address: SocketAddr) -> Readiness {
    let not_ready = |reason: &str, answered: bool| Readiness {
        ready: false,
        reason: Some(reason.to_owned()),
        failed: Vec::new(),
        answered,
    };
    match get(client, address, "/ready").await {
        Ok((status, body)) => match serde_json::from_slice::<ReadyBody>(&body) {
            Ok(body) => Readiness {
                ready: status == 200 && body.status == "ready",
                failed: body
                    .checks
                    .into_iter()
                    .filter(|check| !check.ok)
                    .map(|check| (check.name, check.reason.unwrap_or_default()))
                    .collect(),
                reason: body.reason,
                answered: true,
            },
            Err(_) => not_ready("bad_ready_response", true),
        },
        Err(reason) => not_ready(reason, false),
    }
}

/// Samples of metric values by name (every label set kept apart), as `recovery` reads them.
pub type Samples = std::collections::BTreeMap<String, Vec<f64>>;

/// Each target's readiness, in order, and the samples of every target's `/metrics` merged:
/// what `incident validate` and the console's overview judge recovery by.
pub async fn survey(client: &Client, targets: &[SocketAddr]) -> (Vec<Readiness>, Samples) {
    let mut readiness = Vec::with_capacity(targets.len());
    let mut samples = Samples::new();
    for address in targets {
        readiness.push(ready(client, *address).await);
        if let Ok((200, body)) = get(client, *address, "/metrics").await {
            crate::recovery::samples(&String::from_utf8_lossy(&body), &mut samples);
        }
    }
    (readiness, samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_is_read_from_the_body_and_a_silent_role_is_unreachable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let body = r#"{"status":"not_ready","reason":"store_down","checks":[
            {"name":"store","ok":false,"reason":"store_down"},{"name":"bus","ok":true,"reason":null}]}"#;
        let app = axum::Router::new().route(
            "/ready",
            axum::routing::get(
                move || async move { (http::StatusCode::SERVICE_UNAVAILABLE, body) },
            ),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = client();
        let answer = ready(&client, address).await;
        assert_eq!(
            answer,
            Readiness {
                ready: false,
                reason: Some("store_down".into()),
                failed: vec![("store".into(), "store_down".into())],
                answered: true,
            }
        );
        // Bound to every interface: asked on loopback.
        let wildcard = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), address.port());
        assert_eq!(ready(&client, wildcard).await, answer);

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let silent = ready(&client, gone).await;
        assert!(!silent.ready && !silent.answered);
        assert_eq!(silent.reason.as_deref(), Some("unreachable"));
    }

    #[tokio::test]
    async fn a_survey_reads_each_roles_readiness_in_order_and_merges_their_metrics() {
        let serve = |ready: &'static str, metrics: &'static str| async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let app = axum::Router::new()
                .route("/ready", axum::routing::get(move || async move { ready }))
                .route(
                    "/metrics",
                    axum::routing::get(move || async move { metrics }),
                );
            tokio::spawn(async move { axum::serve(listener, app).await });
            address
        };
        let first = serve(
            r#"{"status":"ready","checks":[]}"#,
            "# HELP x\nbacklog{stream=\"a\"} 3\n",
        )
        .await;
        let second = serve(
            r#"{"status":"ready","checks":[]}"#,
            "backlog{stream=\"b\"} 5\nage 1.5\n",
        )
        .await;
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let (readiness, samples) = survey(&client(), &[first, gone, second]).await;
        let verdicts: Vec<(bool, bool)> = readiness
            .iter()
            .map(|ready| (ready.ready, ready.answered))
            .collect();
        assert_eq!(verdicts, [(true, true), (false, false), (true, true)]);
        assert_eq!(samples.get("backlog"), Some(&vec![3.0, 5.0]));
        assert_eq!(samples.get("age"), Some(&vec![1.5]));
    }
}
