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
    use http_body_util::{BodyExt as _, Full};
    use hyper::body::Bytes;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let token_path = token_file.map_or_else(
        || settings.home.join(caracal_store::ADMIN_TOKEN_FILE),
        ToOwned::to_owned,
    );
    let token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("admin token {}", token_path.display()))?;
    let address = crate::status::api_address(settings);
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"))
        .header("authorization", format!("Bearer {}", token.trim()))
        .header("content-type", "application/json")
        .body(Full::new(body.map_or_else(Bytes::new, |body| {
            Bytes::from(body.to_string())
        })))?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response =
        tokio::time::timeout(std::time::Duration::from_secs(10), client.request(request))
            .await
            .context("the API role did not answer in 10 s")?
            .with_context(|| format!("the API role at {address}"))?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or_default()))
}

/// The `error` code of a refusal, for the one-line message a command prints.
pub fn error_code(answer: &serde_json::Value) -> &str {
    answer
        .get("error")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("unknown")
}
