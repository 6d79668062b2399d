//! OAuth 2.0 client-credentials tokens for `oauth2_client_credentials` providers: fetched by
//! the Gateway from the provider's token endpoint (through the same address guard as any
//! upstream) and reused until shortly before they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt as _;

use super::UpstreamClient;
use crate::wire::Upstream;

/// A token is not used in its last seconds: it could expire on the way.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// Lifetime assumed when the token endpoint names none.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
const MAX_ANSWER_BYTES: usize = 64 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

/// Why no token could be had; the call is refused with 502 `http_request_failed`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the provider's token endpoint is not addressable")]
    NotAddressable,
    #[error("the provider's token endpoint is not an allowed token host")]
    HostNotAllowed,
    #[error("the provider's token endpoint did not answer with a token")]
    NoToken,
}

impl TokenCache {
    /// The access token for `directive`'s client, from the cache or fetched now.
    pub async fn token(
        &self,
        client: &UpstreamClient,
        directive: &Upstream,
        allowlist: &[String],
    ) -> Result<String, TokenError> {
        self.token_until(client, directive, allowlist)
            .await
            .map(|(token, _)| token)
    }

    /// As [`TokenCache::token`], with the instant after which it is no longer used.
    pub async fn token_until(
        &self,
        client: &UpstreamClient,
        directive: &Upstream,
        allowlist: &[String],
    ) -> Result<(String, Instant), TokenError> {
        let token_url = directive.token_url.as_deref().unwrap_or_default();
        let client_id = directive.client_id.as_deref().unwrap_or_default();
        let secret = directive.provider_token.as_deref().unwrap_or_default();
        let scope = directive.token_scope.as_deref().unwrap_or_default();
        // Keyed by everything that makes a different token, the secret only as a digest.
        let key = caracal_crypto::hex(&caracal_crypto::sha256(
            format!("{token_url}\n{client_id}\n{secret}\n{scope}").as_bytes(),
        ));
        if let Some((token, until)) = self
            .tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&key)
            && Instant::now() < *until
        {
            return Ok((token.clone(), *until));
        }
        let (token, lifetime) = fetch(client, directive, allowlist).await?;
        let until = Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN);
        let mut tokens = self
            .tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tokens.retain(|_, (_, until)| Instant::now() < *until);
        tokens.insert(key, (token.clone(), until));
        Ok((token, until))
    }
}

async fn fetch(
    client: &UpstreamClient,
    directive: &Upstream,
    allowlist: &[String],
) -> Result<(String, Duration), TokenError> {
    let token_url = directive.token_url.as_deref().unwrap_or_default();
    let uri = super::upstream::check_url(token_url, allowlist)
        .await
        .map_err(|_| TokenError::NotAddressable)?;
    if let Some(hosts) = directive
        .allowed_token_hosts
        .as_ref()
        .filter(|hosts| !hosts.is_empty())
    {
        let host = uri.host().unwrap_or_default();
        if !hosts
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(host))
        {
            return Err(TokenError::HostNotAllowed);
        }
    }
    let mut form = vec![
        ("grant_type", "client_credentials"),
        (
            "client_id",
            directive.client_id.as_deref().unwrap_or_default(),
        ),
        (
            "client_secret",
            directive.provider_token.as_deref().unwrap_or_default(),
        ),
    ];
    if let Some(scope) = directive.token_scope.as_deref() {
        form.push(("scope", scope));
    }
    let body = serde_urlencoded::to_string(&form).map_err(|_| TokenError::NoToken)?;
    let request = http::Request::post(uri)
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(http::header::ACCEPT, "application/json")
        .body(http_body_util::Limited::new(
            Body::from(body),
            MAX_ANSWER_BYTES,
        ))
        .map_err(|_| TokenError::NoToken)?;
    let answered = tokio::time::timeout(FETCH_TIMEOUT, async {
        let response = client.request(request).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .ok()
            .map(|collected| collected.to_bytes())
    })
    .await
    .ok()
    .flatten()
    .ok_or(TokenError::NoToken)?;
    #[derive(serde::Deserialize)]
    struct Answer {
        access_token: String,
        expires_in: Option<u64>,
    }
    let answer: Answer = serde_json::from_slice(&answered).map_err(|_| TokenError::NoToken)?;
    if answer.access_token.is_empty() {
        return Err(TokenError::NoToken);
    }
    let lifetime = answer
        .expires_in
        .map_or(DEFAULT_LIFETIME, Duration::from_secs);
    Ok((answer.access_token, lifetime))
}
