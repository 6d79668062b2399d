//! `/v1/zones/{zone}/providers`: upstream credential sources. Secret configuration fields are
//! sealed under the KEK in the same transaction as the provider and never listed; only an
//! explicit, audited reveal with write capability returns them.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use caracal_store::{Provider, SealedSecret, now_ms};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    Change, evidence, invalid_body, json, list_query, live_zone, new_id, on_conflict, page,
    slug_of, timestamp, valid_name,
};
use crate::auth::{Access, authenticate};
use crate::error::ApiError;
use crate::state::RoleState;
use crate::wire::{Page, ProviderBody, RevealedSecretsBody};

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/zones/{zone_id}/providers", get(list).post(create))
        .route(
            "/v1/zones/{zone_id}/providers/{id}",
            get(read).patch(update).delete(archive),
        )
        .route(
            "/v1/zones/{zone_id}/providers/{id}/reveal-secrets",
            post(reveal),
        )
}

/// The kinds a provider may have, and the configuration each needs.
const KINDS: [&str; 7] = [
    "none",
    "caracal_mandate",
    "api_key",
    "bearer_token",
    "http_basic",
    "oauth2_client_credentials",
    "oauth2_authorization_code",
];
/// Configuration keys that hold secrets: sealed, never listed.
const SECRET_KEYS: [&str; 10] = [
    "api_key",
    "bearer_token",
    "token",
    "password",
    "client_secret",
    "private_key",
    "secret",
    "assertion",
    "access_token",
    "refresh_token",
];
/// What the envelope of a provider secret is bound to: it opens for nothing else.
use crate::provider_secrets::SECRET_PURPOSE;
const MAX_CONFIG: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SaveProvider {
    name: Option<String>,
    identifier: Option<String>,
    kind: Option<String>,
    config_json: Option<Map<String, Value>>,
}

fn body(provider: Provider) -> ProviderBody {
    let config = serde_json::from_str(&provider.config).unwrap_or(Value::Null);
    ProviderBody {
        secret_config_keys: provider
            .secret_refs
            .iter()
            .filter_map(|reference| reference.rsplit('/').next().map(str::to_owned))
            .collect(),
        id: provider.id,
        zone_id: provider.zone_id,
        name: provider.name,
        identifier: provider.identifier,
        kind: provider.kind,
        config_json: config,
        created_at: timestamp(provider.created_at_ms),
        archived_at: provider.archived_at_ms.map(timestamp),
    }
}

fn secret_ref(provider_id: &str, key: &str) -> String {
    format!("provider/{provider_id}/{key}")
}

/// `provider://` + a slug.
fn valid_identifier(identifier: &str) -> Result<String, ApiError> {
    let slug = identifier.strip_prefix("provider://").unwrap_or_default();
    let well_formed = !slug.is_empty()
        && slug.len() <= 120
        && slug.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"-_.".contains(&byte)
        });
    if !well_formed {
        return Err(invalid_body(
            "identifier",
            "must be provider:// followed by 1 to 120 of a-z 0-9 - _ .",
        ));
    }
    Ok(identifier.to_owned())
}

/// A provider's configuration: the public part, and the secrets by key.
type SplitConfig = (Map<String, Value>, BTreeMap<String, String>);

/// Splits configuration into its public part and its secrets, and checks that the kind has
/// what it needs (`held` names the secrets already stored).
fn split_config(
    kind: &str,
    config: Map<String, Value>,
    held: &[String],
) -> Result<SplitConfig, ApiError> {
    let mut public = Map::new();
    let mut secrets = BTreeMap::new();
    for (key, value) in config {
        if SECRET_KEYS.contains(&key.as_str()) {
            let Value::String(text) = value else {
                return Err(invalid_body(
                    &format!("config_json.{key}"),
                    "a secret is a string",
                ));
            };
            if text.is_empty() || text.len() > 16 * 1024 {
                return Err(invalid_body(
                    &format!("config_json.{key}"),
                    "must be 1 to 16384 bytes",
                ));
            }
            secrets.insert(key, text);
        } else {
            public.insert(key, value);
        }
    }
    let has = |key: &str| secrets.contains_key(key) || held.iter().any(|name| name == key);
    let text = |key: &str| {
        public
            .get(key)
            .and_then(Value::as_str)
            .is_some_and(|v| !v.is_empty())
    };
    let missing: Option<&str> = match kind {
        "api_key" if !has("api_key") => Some("api_key"),
        "bearer_token" if !has("bearer_token") && !has("token") => Some("bearer_token"),
        "http_basic" if !text("username") => Some("username"),
        "http_basic" if !has("password") => Some("password"),
        "oauth2_client_credentials" if !text("token_url") => Some("token_url"),
        "oauth2_client_credentials" if !text("client_id") => Some("client_id"),
        "oauth2_client_credentials" if !has("client_secret") && !has("private_key") => {
            Some("client_secret")
        }
        "oauth2_authorization_code" if !text("token_url") => Some("token_url"),
        "oauth2_authorization_code" if !text("client_id") => Some("client_id"),
        _ => None,
    };
    if let Some(key) = missing {
        return Err(invalid_body(
            &format!("config_json.{key}"),
            &format!("a `{kind}` provider needs `{key}`"),
        ));
    }
    if kind.starts_with("oauth2_") {
        let url = public
            .get("token_url")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(invalid_body(
                "config_json.token_url",
                "must be an http(s) URL",
            ));
        }
    }
    // Where a subject's browser is sent, and back: never anything but https (http on loopback).
    for key in ["authorization_url", "redirect_uri"] {
        if let Some(url) = public.get(key)
            && url.as_str().and_then(super::https_or_loopback).is_none()
        {
            return Err(invalid_body(
                &format!("config_json.{key}"),
                "must be an https URL (http only on loopback)",
            ));
        }
    }
    if serde_json::to_string(&public).map_or(0, |text| text.len()) > MAX_CONFIG {
        return Err(invalid_body("config_json", "is larger than 64 KiB"));
    }
    Ok((public, secrets))
}

fn seal(
    state: &RoleState,
    zone_id: &str,
    provider_id: &str,
    secrets: &BTreeMap<String, String>,
) -> Result<Vec<SealedSecret>, ApiError> {
    secrets
        .iter()
        .map(|(key, value)| {
            let reference = secret_ref(provider_id, key);
            crate::provider_secrets::sealed(
                &state.shared,
                zone_id,
                reference,
                SECRET_PURPOSE,
                value,
            )
            .map_err(|error| {
                tracing::error!(%error, "sealing a provider secret failed");
                ApiError::new(ErrorCode::InternalError)
            })
        })
        .collect()
}

fn identifier_taken(identifier: &str) -> ApiError {
    ApiError::with_description(
        ErrorCode::ProviderIdentifierConflict,
        format!("a provider `{identifier}` exists in this zone"),
    )
}

pub(super) async fn live_provider(
    state: &RoleState,
    zone_id: &str,
    id: &str,
) -> Result<Provider, ApiError> {
    match state.shared.store.get_provider(zone_id, id).await? {
        Some(provider) if provider.archived_at_ms.is_none() => Ok(provider),
        _ => Err(ApiError::with_description(
            ErrorCode::NotFound,
            format!("provider `{id}` not found"),
        )),
    }
}

async fn list(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<ProviderBody>>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query = list_query(raw.as_deref())?;
    let providers: Vec<Provider> = state
        .shared
        .store
        .list_providers(&zone_id)
        .await?
        .into_iter()
        .filter(|provider| provider.archived_at_ms.is_none())
        .collect();
    Ok(Json(page(
        providers,
        |p| (p.created_at_ms, p.id.clone()),
        &query,
        body,
    )?))
}

async fn create(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<(StatusCode, Json<ProviderBody>), ApiError> {
    let caller = authenticate(&state, &headers).await?;
    super::incident::refuse_when_frozen(&state)?;
    live_zone(&state, &caller, &zone_id, Access::Write).await?;
    let request: SaveProvider = json(&raw)?;
    let kind = request
        .kind
        .ok_or_else(|| invalid_body("kind", "is required"))?;
    if !KINDS.contains(&kind.as_str()) {
        return Err(invalid_body(
            "kind",
            &format!("must be one of {}", KINDS.join(", ")),
        ));
    }
    let (name, identifier) = match (request.name, request.identifier) {
        (None, None) => return Err(invalid_body("name", "a name or an identifier is required")),
        (name, Some(identifier)) => {
            let identifier = valid_identifier(&identifier)?;
            (
                name.unwrap_or_else(|| identifier.trim_start_matches("provider://").to_owned()),
                identifier,
            )
        }
        (Some(name), None) => {
            let identifier = format!("provider://{}", slug_of(&name, 120, "provider"));
            (name, identifier)
        }
    };
    let name = valid_name(&name)?;
    let (public, secrets) = split_config(&kind, request.config_json.unwrap_or_default(), &[])?;
    let id = new_id();
    let provider = Provider {
        secret_refs: secrets.keys().map(|key| secret_ref(&id, key)).collect(),
        id: id.clone(),
        zone_id: zone_id.clone(),
        name,
        identifier,
        kind,
        config: Value::Object(public).to_string(),
        created_at_ms: now_ms(),
        archived_at_ms: None,
    };
    let sealed = seal(&state, &zone_id, &id, &secrets)?;
    let mut fields = vec!["name", "identifier", "kind", "config_json"];
    if !secrets.is_empty() {
        fields.push("secret");
    }
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "provider.create",
            entity_type: "provider",
            entity_id: &id,
            fields,
        },
    )?;
    state
        .shared
        .store
        .save_provider(&provider, &sealed, &[evidence])
        .await
        .map_err(on_conflict(identifier_taken(&provider.identifier)))?;
    Ok((StatusCode::CREATED, Json(body(provider))))
}

async fn read(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<ProviderBody>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    Ok(Json(body(live_provider(&state, &zone_id, &id).await?)))
}

async fn update(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<ProviderBody>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    super::incident::refuse_when_frozen(&state)?;
    live_zone(&state, &caller, &zone_id, Access::Write).await?;
    let request: SaveProvider = json(&raw)?;
    let current = live_provider(&state, &zone_id, &id).await?;
    let mut fields = Vec::new();
    let kind = match request.kind {
        Some(kind) if KINDS.contains(&kind.as_str()) => {
            fields.push("kind");
            kind
        }
        Some(_) => {
            return Err(invalid_body(
                "kind",
                &format!("must be one of {}", KINDS.join(", ")),
            ));
        }
        None => current.kind.clone(),
    };
    let name = match request.name {
        Some(name) => {
            fields.push("name");
            valid_name(&name)?
        }
        None => current.name.clone(),
    };
    let identifier = match request.identifier {
        Some(identifier) => {
            fields.push("identifier");
            valid_identifier(&identifier)?
        }
        None => current.identifier.clone(),
    };
    let held: Vec<String> = body(current.clone()).secret_config_keys;
    let (public, secrets) = match request.config_json {
        Some(config) => {
            fields.push("config_json");
            split_config(&kind, config, &held)?
        }
        None => {
            let config = serde_json::from_str(&current.config).unwrap_or_default();
            split_config(&kind, config, &held)?
        }
    };
    if !secrets.is_empty() {
        fields.push("secret");
    }
    let sealed = seal(&state, &zone_id, &id, &secrets)?;
    let mut secret_refs = current.secret_refs.clone();
    for key in secrets.keys() {
        let reference = secret_ref(&id, key);
        if !secret_refs.contains(&reference) {
            secret_refs.push(reference);
        }
    }
    let provider = Provider {
        name,
        identifier,
        kind,
        config: Value::Object(public).to_string(),
        secret_refs,
        ..current
    };
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: if fields.contains(&"secret") {
                "provider.rotate_secret"
            } else {
                "provider.update"
            },
            entity_type: "provider",
            entity_id: &id,
            fields,
        },
    )?;
    state
        .shared
        .store
        .save_provider(&provider, &sealed, &[evidence])
        .await
        .map_err(on_conflict(identifier_taken(&provider.identifier)))?;
    Ok(Json(body(provider)))
}

/// The provider's secrets in clear: write capability, and recorded before they are returned.
async fn reveal(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<RevealedSecretsBody>, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let provider = live_provider(&state, &zone_id, &id).await?;
    let secrets = crate::provider_secrets::open(&state.shared, &provider)
        .await
        .map_err(|error| match error {
            crate::provider_secrets::OpenError::Store(store) => ApiError::from(store),
            crate::provider_secrets::OpenError::Unopenable => {
                ApiError::new(ErrorCode::InternalError)
            }
        })?;
    // A reveal changes nothing in the store, so its evidence goes through the producer, which
    // answers only once the event is on the stream or in a replay file.
    let message = super::audit_event(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "provider.reveal_secrets",
            entity_type: "provider",
            entity_id: &id,
            fields: vec!["secrets"],
        },
    );
    super::record_now(&state, message).await?;
    Ok(Json(RevealedSecretsBody { secrets }))
}

async fn archive(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    super::incident::refuse_when_frozen(&state)?;
    live_zone(&state, &caller, &zone_id, Access::Write).await?;
    live_provider(&state, &zone_id, &id).await?;
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "provider.archive",
            entity_type: "provider",
            entity_id: &id,
            fields: vec![],
        },
    )?;
    state
        .shared
        .store
        .archive_provider(&zone_id, &id, &[evidence])
        .await
        .map_err(on_conflict(ApiError::with_description(
            ErrorCode::ProviderInUse,
            "a live resource uses this provider; archive or rebind it first",
        )))?;
    Ok(StatusCode::NO_CONTENT)
}
