//! Commands that act on a running stack go through the API role with the admin token, so the
//! action is authorised, audited and applied exactly as it would be over the API.

use anyhow::Context as _;
use caracal_services::Settings;

/// `POST {api}{path}` with `body` as JSON and the admin token from `token_file` (default
/// `$CARACAL_HOME/admin-token`); returns the status and the JSON answer.
pub async fn post(
    settings: &Settings,
    token_file: Option<&std::path::Path>,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<(hyper::StatusCode, serde_json::Value)> {
    call(settings, token_file, hyper::Method::POST, path, Some(body)).await
}

/// `GET {api}{path}` with the admin token, as [`post`].
pub async fn get(
    settings: &Settings,
    token_file: Option<&std::path::Path>,
    path: &str,
) -> anyhow::Result<(hyper::StatusCode, serde_json::Value)> {
    call(settings, token_file, hyper::Method::GET, path, None).await
}

async fn call(
    settings: &Settings,
    token_file: Option<&std::path::Path>,
    method: hyper::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(hyper::StatusCode, serde_json::Value)> {
    let token = read_token(settings, token_file)?;
    call_as(settings, &token, method, path, body).await
}

/// The admin token in `token_file` (default `$CARACAL_HOME/admin-token`).
pub fn read_token(
    settings: &Settings,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    let token_path = token_file.map_or_else(
        || settings.home.join(caracal_store::ADMIN_TOKEN_FILE),
        ToOwned::to_owned,
    );
    let token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("admin token {}", token_path.display()))?;
    Ok(token.trim().to_owned())
}

/// `GET {api}{path}` with the admin token `token` itself.
pub async fn get_as(
    settings: &Settings,
    token: &str,
    path: &str,
) -> anyhow::Result<(hyper::StatusCode, serde_json::Value)> {
    call_as(settings, token, hyper::Method::GET, path, None).await
}

async fn call_as(
    settings: &Settings,
    token: &str,
    method: hyper::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(hyper::StatusCode, serde_json::Value)> {
    let bearer = format!("Bearer {token}");
    let address = crate::status::api_address(settings);
    send(
        address,
        method,
        path,
        &[
            ("authorization", bearer.as_str()),
            ("content-type", "application/json"),
        ],
        body.map(|body| body.to_string()).unwrap_or_default(),
    )
    .await
    .with_context(|| format!("the API role at {address}"))
}

/// One request to a role at `address` (10 s at most): the answer's status and its JSON body
/// (null when the body is not JSON).
pub async fn send(
    address: std::net::SocketAddr,
    method: hyper::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> anyhow::Result<(hyper::StatusCode, serde_json::Value)> {
    let (status, _, answer) = send_full(address, method, path, headers, body).await?;
    Ok((status, answer))
}

/// As [`send`], with the answer's headers.
pub async fn send_full(
    address: std::net::SocketAddr,
    method: hyper::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> anyhow::Result<(hyper::StatusCode, hyper::HeaderMap, serde_json::Value)> {
    use http_body_util::{BodyExt as _, Full};
    use hyper::body::Bytes;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body)))?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response =
        tokio::time::timeout(std::time::Duration::from_secs(10), client.request(request))
            .await
            .with_context(|| format!("{address} did not answer in 10 s"))??;
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or_default(),
    ))
}

/// The `error` code of a refusal, for the one-line message a command prints.
pub fn error_code(answer: &serde_json::Value) -> &str {
    answer
        .get("error")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("unknown")
}
