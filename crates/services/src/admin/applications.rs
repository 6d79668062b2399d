//! `/v1/zones/{zone}/applications`: the zone's confidential clients. A client secret is
//! shown once (on create and rotate) and stored only as an Argon2id hash.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caracal_core::{ErrorCode, RequestId};
use caracal_crypto::{MIN_SECRET_CHARS, hash_secret};
use caracal_store::{Application, ApplicationChange, StoreError, now_ms};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;

use super::{
    Change, evidence, invalid_body, json, list_query, new_id, on_conflict, page, timestamp,
    valid_name,
};
use crate::auth::{Access, AdminCaller, authenticate};
use crate::error::ApiError;
use crate::state::RoleState;
use crate::wire::{ApplicationBody, Page};

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/zones/{zone_id}/applications", get(list).post(create))
        .route("/v1/zones/{zone_id}/applications/dcr", post(register))
        .route(
            "/v1/zones/{zone_id}/applications/{id}",
            get(read).patch(update).delete(archive),
        )
        .route(
            "/v1/zones/{zone_id}/applications/{id}/rotate-secret",
            post(rotate_secret),
        )
        .route(
            "/v1/zones/{zone_id}/applications/{id}/client-secret",
            get(reveal_secret),
        )
}

const MAX_TRAITS: usize = 64;
const MAX_TRAIT: usize = 128;
const MAX_SECRET: usize = 1024;
/// Trait namespaces only a global token may assign: they confer deployment-wide powers.
const PRIVILEGED_TRAITS: [&str; 2] = ["control:", "caracal.sys:"];

/// Whether `item` is in a privileged namespace (a control key's traits among them).
pub(crate) fn privileged_trait(item: &str) -> bool {
    PRIVILEGED_TRAITS
        .iter()
        .any(|prefix| item.starts_with(prefix))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateApplication {
    name: String,
    registration_method: String,
    traits: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateApplication {
    name: Option<String>,
    client_secret: Option<String>,
    traits: Option<Vec<String>>,
}

fn body(application: Application, client_secret: Option<String>) -> ApplicationBody {
    ApplicationBody {
        id: application.id,
        zone_id: application.zone_id,
        name: application.name,
        registration_method: application.registration_method,
        credential_type: "token",
        traits: application.traits,
        has_client_secret: application.client_secret_hash.is_some(),
        expires_at: application.expires_at_ms.map(timestamp),
        created_at: timestamp(application.created_at_ms),
        archived_at: application.archived_at_ms.map(timestamp),
        client_secret,
    }
}

/// Traits: at most 64, each `[A-Za-z][A-Za-z0-9._:-]*` up to 128 characters, no repeats;
/// privileged namespaces need a global token.
fn valid_traits(caller: &AdminCaller, traits: Vec<String>) -> Result<Vec<String>, ApiError> {
    if traits.len() > MAX_TRAITS {
        return Err(invalid_body(
            "traits",
            &format!("at most {MAX_TRAITS} traits"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for item in &traits {
        let mut bytes = item.bytes();
        let well_formed = item.len() <= MAX_TRAIT
            && bytes
                .next()
                .is_some_and(|first| first.is_ascii_alphabetic())
            && bytes.all(|byte| byte.is_ascii_alphanumeric() || b"._:-".contains(&byte));
        if !well_formed {
            return Err(invalid_body(
                "traits",
                &format!(
                    "`{item}` is not a trait (letters, digits, . _ : -, starting with a letter, at most {MAX_TRAIT})"
                ),
            ));
        }
        if !seen.insert(item.as_str()) {
            return Err(invalid_body("traits", &format!("`{item}` is repeated")));
        }
        if super::token_zone(caller).is_some() && privileged_trait(item) {
            return Err(ApiError::with_description(
                ErrorCode::AdminTokenZoneMismatch,
                format!("trait `{item}` needs a global token"),
            ));
        }
    }
    Ok(traits)
}

/// A control key may not change, rotate or archive an application holding privileged traits
/// (a control key, its own or another's): taking over a broader key would widen its
/// authority. Admin tokens of the zone already hold more than any of its keys.
fn changeable_by(caller: &AdminCaller, application: &Application) -> Result<(), ApiError> {
    let privileged = application.traits.iter().any(|item| privileged_trait(item));
    if caller.is_control_key() && privileged {
        return Err(ApiError::with_description(
            ErrorCode::AdminTokenZoneMismatch,
            "a control key cannot change a control key; an admin token can",
        ));
    }
    Ok(())
}

fn valid_secret(secret: &str) -> Result<(), ApiError> {
    let length = secret.chars().count();
    if !(MIN_SECRET_CHARS..=MAX_SECRET).contains(&length) || secret.chars().any(char::is_control) {
        return Err(invalid_body(
            "client_secret",
            &format!("must be {MIN_SECRET_CHARS} to {MAX_SECRET} printable characters"),
        ));
    }
    Ok(())
}

/// A fresh secret (`prefix` + 32 random bytes, base64url: `cs_` for clients, `ws_` for
/// workloads) and its hash.
pub(super) async fn new_secret(prefix: &str) -> Result<(String, String), ApiError> {
    let secret = random_secret(prefix)?;
    let hashed = hash(secret.clone()).await?;
    Ok((secret, hashed))
}

/// `prefix` and 32 random bytes, base64url: every secret this API hands out.
pub(super) fn random_secret(prefix: &str) -> Result<String, ApiError> {
    let bytes: [u8; 32] = caracal_crypto::random_bytes().map_err(|_| internal("random"))?;
    Ok(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// Argon2id on a blocking thread: it takes 64 MiB and tens of milliseconds by design.
async fn hash(secret: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || hash_secret(&secret))
        .await
        .map_err(|_| internal("hash worker"))?
        .map_err(|_| internal("hash"))
}

fn internal(what: &str) -> ApiError {
    tracing::error!(what, "client secret generation failed");
    ApiError::new(ErrorCode::InternalError)
}

fn name_conflict(name: &str) -> ApiError {
    ApiError::with_description(
        ErrorCode::ApplicationNameConflict,
        format!("an application named `{name}` exists in this zone"),
    )
}

pub(super) async fn live_application(
    state: &RoleState,
    zone_id: &str,
    id: &str,
) -> Result<Application, ApiError> {
    match state.shared.store.get_application(zone_id, id).await? {
        Some(application) if application.archived_at_ms.is_none() => Ok(application),
        _ => Err(ApiError::with_description(
            ErrorCode::NotFound,
            format!("application `{id}` not found"),
        )),
    }
}

async fn list(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<ApplicationBody>>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query = list_query(raw.as_deref())?;
    let archived = match query.status.as_deref() {
        None | Some("active") => false,
        Some("archived") => true,
        Some(_) => {
            return Err(ApiError::with_description(
                ErrorCode::InvalidRequest,
                "`status` is active or archived",
            ));
        }
    };
    let applications: Vec<Application> = state
        .shared
        .store
        .list_applications(&zone_id)
        .await?
        .into_iter()
        .filter(|application| application.archived_at_ms.is_some() == archived)
        .collect();
    Ok(Json(page(
        applications,
        |application| (application.created_at_ms, application.id.clone()),
        &query,
        |application| body(application, None),
    )?))
}

async fn create(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<(StatusCode, Json<ApplicationBody>), ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: CreateApplication = json(&raw)?;
    let name = valid_name(&request.name)?;
    if request.registration_method != "managed" {
        return Err(invalid_body(
            "registration_method",
            "must be `managed` (register dynamic clients with POST …/applications/dcr)",
        ));
    }
    let traits = valid_traits(&caller, request.traits.unwrap_or_default())?;
    let (secret, secret_hash) = new_secret("cs_").await?;
    let application = Application {
        id: new_id(),
        zone_id: zone_id.clone(),
        name,
        client_secret_hash: Some(secret_hash),
        traits,
        registration_method: "managed".to_owned(),
        expires_at_ms: None,
        created_at_ms: now_ms(),
        archived_at_ms: None,
    };
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "application.create",
            entity_type: "application",
            entity_id: &application.id,
            fields: vec!["name", "traits", "client_secret"],
        },
    )?;
    state
        .shared
        .store
        .create_application(&application, &[evidence])
        .await
        .map_err(on_conflict(name_conflict(&application.name)))?;
    Ok((StatusCode::CREATED, Json(body(application, Some(secret)))))
}

/// Live registered applications a zone may hold at once.
const MAX_LIVE_DCR: i64 = 1000;
/// Registrations a minute per caller (the reference's ten a second).
const DCR_PER_MINUTE: u64 = 600;
const MAX_DCR_SECONDS: i64 = 3600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    name: String,
    expires_in: Option<i64>,
}

/// `POST …/applications/dcr` (`{name, expires_in?}`): a short-lived client (at most an hour,
/// the default) in a zone that accepts dynamic registration, without traits; its secret is
/// shown once. The STS treats it as any application until it expires.
async fn register(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse as _;
    let caller = authenticate(&state, &headers).await?;
    let zone = super::live_zone(&state, &caller, &zone_id, Access::Write).await?;
    let request: Registration = json(&raw)?;
    let name = valid_name(&request.name)?;
    let expires_in = request.expires_in.unwrap_or(MAX_DCR_SECONDS);
    if !(1..=MAX_DCR_SECONDS).contains(&expires_in) {
        return Err(invalid_body(
            "expires_in",
            &format!("must be 1 to {MAX_DCR_SECONDS} seconds"),
        ));
    }
    if !zone.dcr_enabled {
        return Err(ApiError::with_description(
            ErrorCode::DcrDisabled,
            format!("zone `{zone_id}` does not accept dynamic client registration"),
        ));
    }
    let bucket = format!("dcr:{}", caller.actor());
    if let Some(refused) = crate::auth::spend_budget(&state, &bucket, DCR_PER_MINUTE).await? {
        return Ok(refused);
    }
    let (secret, secret_hash) = new_secret("cs_").await?;
    let now = now_ms();
    let application = Application {
        id: new_id(),
        zone_id: zone_id.clone(),
        name,
        client_secret_hash: Some(secret_hash),
        traits: Vec::new(),
        registration_method: "dcr".to_owned(),
        expires_at_ms: Some(now + expires_in * 1000),
        created_at_ms: now,
        archived_at_ms: None,
    };
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "application.register",
            entity_type: "application",
            entity_id: &application.id,
            fields: vec!["name", "expires_at", "client_secret"],
        },
    )?;
    state
        .shared
        .store
        .register_dcr_application(&application, MAX_LIVE_DCR, &[evidence])
        .await
        .map_err(|error| match error {
            StoreError::LimitReached(_) => ApiError::with_description(
                ErrorCode::ZoneLimitExceeded,
                format!("a zone holds at most {MAX_LIVE_DCR} live registered applications"),
            ),
            // Registration was turned off since the zone was read.
            StoreError::NotFound(_) => ApiError::with_description(
                ErrorCode::DcrDisabled,
                format!("zone `{zone_id}` does not accept dynamic client registration"),
            ),
            other => on_conflict(name_conflict(&application.name))(other),
        })?;
    Ok((StatusCode::CREATED, Json(body(application, Some(secret)))).into_response())
}

async fn read(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<ApplicationBody>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    Ok(Json(body(
        live_application(&state, &zone_id, &id).await?,
        None,
    )))
}

async fn update(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<ApplicationBody>, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: UpdateApplication = json(&raw)?;
    let current = live_application(&state, &zone_id, &id).await?;
    changeable_by(&caller, &current)?;
    let mut fields = Vec::new();
    let name = match &request.name {
        Some(name) => {
            fields.push("name");
            valid_name(name)?
        }
        None => current.name.clone(),
    };
    let traits = match request.traits {
        Some(traits) => {
            fields.push("traits");
            valid_traits(&caller, traits)?
        }
        None => current.traits.clone(),
    };
    let client_secret_hash = match &request.client_secret {
        Some(secret) => {
            fields.push("client_secret");
            valid_secret(secret)?;
            Some(hash(secret.clone()).await?)
        }
        None => None,
    };
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "application.update",
            entity_type: "application",
            entity_id: &id,
            fields,
        },
    )?;
    let change = ApplicationChange {
        name,
        traits,
        client_secret_hash,
    };
    state
        .shared
        .store
        .update_application(&zone_id, &id, &change, &[evidence])
        .await
        .map_err(on_conflict(name_conflict(&change.name)))?;
    Ok(Json(body(
        live_application(&state, &zone_id, &id).await?,
        None,
    )))
}

async fn rotate_secret(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<ApplicationBody>, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let current = live_application(&state, &zone_id, &id).await?;
    changeable_by(&caller, &current)?;
    let (secret, secret_hash) = new_secret("cs_").await?;
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "application.rotate_secret",
            entity_type: "application",
            entity_id: &id,
            fields: vec!["client_secret"],
        },
    )?;
    state
        .shared
        .store
        .set_application_secret(&zone_id, &id, &secret_hash, &[evidence])
        .await?;
    let mut rotated = current;
    rotated.client_secret_hash = Some(secret_hash);
    Ok(Json(body(rotated, Some(secret))))
}

/// Only the hash is kept, so there is nothing to reveal: rotate instead.
async fn reveal_secret(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<ApplicationBody>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    live_application(&state, &zone_id, &id).await?;
    Err(ApiError::with_description(
        ErrorCode::ClientSecretNotStored,
        "only a hash of the client secret is kept; rotate it to get a new one",
    ))
}

async fn archive(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    changeable_by(&caller, &live_application(&state, &zone_id, &id).await?)?;
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "application.archive",
            entity_type: "application",
            entity_id: &id,
            fields: vec![],
        },
    )?;
    state
        .shared
        .store
        .archive_application(&zone_id, &id, &[evidence])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
