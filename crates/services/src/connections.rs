//! Provider connections: a subject's (or the zone's shared, `caracal:shared`) upstream account
//! at an `oauth2_authorization_code` provider, its tokens sealed under the KEK. The admin API
//! stores them; the STS reads the access token of the subject's connection (the shared one
//! when the subject never connected) for the Gateway to inject, refreshing it first when it is about
//! to expire. No live connection, or a refresh that fails, is a refusal: never a call without
//! the subject's own credential, never one with a stale token.

use std::time::Duration;

use caracal_store::{Provider, ProviderConnection, SealedSecret, StoreError, now_ms};
use serde_json::Value;

use crate::state::Shared;

/// The subject of a connection shared by the whole zone.
pub const SHARED: &str = "caracal:shared";
/// The KEK purpose connection tokens are sealed under.
pub const PURPOSE: &str = "provider-connection";
/// A token this close to its expiry is refreshed before use.
const REFRESH_MARGIN_MS: i64 = 30_000;
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// Refreshes are rare and a provider may rotate its refresh token on use: one at a time in a
/// process, so two calls never spend the same refresh token; across replicas the store keeps
/// only the first refresh of a reading (`refresh_provider_connection`).
static REFRESHING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("no live connection of `{subject}` (or of the zone) to provider `{provider}`")]
    Missing { subject: String, provider: String },
    #[error("the connection of `{subject}` to provider `{provider}` was revoked")]
    Revoked { subject: String, provider: String },
    #[error("the connection's token expired and it holds no refresh token")]
    Expired,
    #[error("the connection's token could not be refreshed: {0}")]
    Refresh(String),
    #[error("the connection's token is unavailable")]
    Unavailable,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `value` sealed under `secret_ref` in `zone_id`.
pub fn seal(
    shared: &Shared,
    zone_id: &str,
    secret_ref: String,
    value: &str,
) -> Result<SealedSecret, ConnectionError> {
    crate::provider_secrets::sealed(shared, zone_id, secret_ref, PURPOSE, value).map_err(|error| {
        tracing::error!(%error, "sealing a connection token failed");
        ConnectionError::Unavailable
    })
}

/// The live connection `subject` holds at `provider`, or, when the subject never connected,
/// the zone's shared one. A subject whose own connection was revoked is refused: its access
/// was withdrawn, and the shared account must not stand in for it.
async fn live(
    shared: &Shared,
    provider: &Provider,
    subject: Option<&str>,
) -> Result<ProviderConnection, ConnectionError> {
    for candidate in subject.into_iter().chain([SHARED]) {
        if let Some(connection) = shared
            .store
            .get_provider_connection(&provider.zone_id, candidate, &provider.id)
            .await?
        {
            if connection.status == "connected" {
                return Ok(connection);
            }
            return Err(ConnectionError::Revoked {
                subject: candidate.to_owned(),
                provider: provider.identifier.clone(),
            });
        }
    }
    Err(ConnectionError::Missing {
        subject: subject.unwrap_or(SHARED).to_owned(),
        provider: provider.identifier.clone(),
    })
}

async fn open(
    shared: &Shared,
    zone_id: &str,
    secret_ref: Option<&str>,
) -> Result<Option<String>, ConnectionError> {
    let Some(secret_ref) = secret_ref else {
        return Ok(None);
    };
    let Some(sealed) = shared.store.get_sealed_secret(zone_id, secret_ref).await? else {
        return Ok(None);
    };
    let plaintext = shared.kek.open(PURPOSE, &sealed.envelope).map_err(|_| {
        tracing::error!(secret_ref, "a connection token does not open");
        ConnectionError::Unavailable
    })?;
    Ok(Some(String::from_utf8_lossy(&plaintext).into_owned()))
}

fn fresh(connection: &ProviderConnection, now: i64) -> bool {
    connection
        .expires_at_ms
        .is_none_or(|at| at > now + REFRESH_MARGIN_MS)
}

/// The access token to inject for `subject` at `provider` (an `oauth2_authorization_code`
/// provider whose `config` and opened `secrets` are given), and the connection it came from.
pub async fn access_token(
    shared: &Shared,
    provider: &Provider,
    config: &serde_json::Map<String, Value>,
    secrets: &std::collections::BTreeMap<String, String>,
    subject: Option<&str>,
) -> Result<(String, ProviderConnection), ConnectionError> {
    let mut connection = live(shared, provider, subject).await?;
    if !fresh(&connection, now_ms()) {
        let _one_at_a_time = REFRESHING.lock().await;
        // Another call may have refreshed it while this one waited.
        connection = live(shared, provider, Some(&connection.subject_id)).await?;
        if !fresh(&connection, now_ms()) {
            let subject_id = connection.subject_id.clone();
            match refresh(shared, provider, config, secrets, connection).await {
                Ok(refreshed) => connection = refreshed,
                // Another replica may have refreshed it first (spending a rotated refresh
                // token, or winning the write): its stored pair serves, if it is fresh.
                Err(error) => {
                    connection = live(shared, provider, Some(&subject_id)).await?;
                    if !fresh(&connection, now_ms()) {
                        return Err(error);
                    }
                }
            }
        }
    }
    let token = open(
        shared,
        &provider.zone_id,
        connection.access_token_ref.as_deref(),
    )
    .await?
    .ok_or(ConnectionError::Unavailable)?;
    Ok((token, connection))
}

/// RFC 6749 §6: a new access token (and perhaps refresh token) for `connection`, stored
/// sealed in place of the old before it is used.
async fn refresh(
    shared: &Shared,
    provider: &Provider,
    config: &serde_json::Map<String, Value>,
    secrets: &std::collections::BTreeMap<String, String>,
    connection: ProviderConnection,
) -> Result<ProviderConnection, ConnectionError> {
    let refresh_token = open(
        shared,
        &provider.zone_id,
        connection.refresh_token_ref.as_deref(),
    )
    .await?
    .ok_or(ConnectionError::Expired)?;
    let text = |key: &str| config.get(key).and_then(Value::as_str).unwrap_or_default();
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token.as_str()),
        ("client_id", text("client_id")),
    ];
    if let Some(secret) = secrets.get("client_secret") {
        form.push(("client_secret", secret));
    }
    let body = serde_urlencoded::to_string(&form)
        .map_err(|error| ConnectionError::Refresh(error.to_string()))?;
    let answer = token_endpoint(text("token_url"), body, &shared.upstream_host_allowlist)
        .await
        .map_err(ConnectionError::Refresh)?;
    let seen = connection.refreshed_at_ms;
    let (connection, sealed) = with_tokens(shared, connection, &answer)?;
    shared
        .store
        .refresh_provider_connection(&connection, seen, &sealed)
        .await?;
    Ok(connection)
}

/// `connection` holding the tokens of a token endpoint's `answer` (RFC 6749 §5.1), and those
/// tokens sealed to store with it; a refresh token the answer does not rotate stays as it was.
pub fn with_tokens(
    shared: &Shared,
    mut connection: ProviderConnection,
    answer: &serde_json::Map<String, Value>,
) -> Result<(ProviderConnection, Vec<SealedSecret>), ConnectionError> {
    let token = |key: &str| {
        answer
            .get(key)
            .and_then(Value::as_str)
            .filter(|token| !token.is_empty() && token.len() <= 16 * 1024)
    };
    let access_token = token("access_token")
        .ok_or_else(|| ConnectionError::Refresh("the answer holds no access_token".into()))?;
    let now = now_ms();
    let (zone_id, id) = (connection.zone_id.clone(), connection.id.clone());
    let mut sealed = vec![seal(
        shared,
        &zone_id,
        format!("connection/{id}/access_token"),
        access_token,
    )?];
    if let Some(rotated) = token("refresh_token") {
        sealed.push(seal(
            shared,
            &zone_id,
            format!("connection/{id}/refresh_token"),
            rotated,
        )?);
        connection.refresh_token_ref = Some(format!("connection/{id}/refresh_token"));
    }
    connection.access_token_ref = Some(format!("connection/{id}/access_token"));
    connection.expires_at_ms = answer
        .get("expires_in")
        .and_then(Value::as_i64)
        .filter(|seconds| *seconds > 0)
        .map(|seconds| now.saturating_add(seconds.saturating_mul(1000)));
    connection.refreshed_at_ms = Some(now);
    connection.status = "connected".to_owned();
    Ok((connection, sealed))
}

/// The token endpoint's JSON answer to `form` (RFC 6749 §5.1), or why there is none.
pub async fn token_endpoint(
    url: &str,
    form: String,
    allowlist: &[String],
) -> Result<serde_json::Map<String, Value>, String> {
    crate::gateway::upstream::fetch_json(
        url,
        Some(form),
        allowlist,
        MAX_TOKEN_RESPONSE,
        REFRESH_TIMEOUT,
    )
    .await
    .map_err(|why| format!("the token endpoint: {why}"))
}
