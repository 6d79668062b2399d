//! The published admin client's bookkeeping surfaces: federated subject issuers, delegated
//! grants and workloads (launcher identities). They are recorded, audited and listed; no
//! authorization path reads them (this STS offers no subject federation and no launcher), except
//! that revoking a grant cuts every authority path of its user, as the kill switch does.
//! Workload secrets are stored Argon2id-hashed with a copy sealed under the KEK; the copy is
//! revealed only with write capability (the reference lets a read token reveal it), audited.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use caracal_store::{AdminObject, StoreError, now_ms};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Change, ListQuery, evidence, invalid_body, json, live_zone, new_id, page, timestamp};
use crate::auth::{Access, AdminCaller, authenticate};
use crate::error::ApiError;
use crate::state::RoleState;
use crate::wire::Page;

const ISSUER: &str = "subject_issuer";
const GRANT: &str = "grant";
const WORKLOAD: &str = "workload";
const MAX_ISSUERS: i64 = 20;
/// Body keys that never leave the API (the workload secret's hash and sealed copy).
const PRIVATE_PREFIX: char = '_';
const SEAL_PURPOSE: &str = "workload-secret";

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route(
            "/v1/zones/{zone_id}/subject-issuers",
            get(|State(state), headers, Path(zone), RawQuery(raw)| {
                list_of(ISSUER, state, headers, zone, raw)
            })
            .post(create_issuer),
        )
        .route(
            "/v1/zones/{zone_id}/subject-issuers/{id}",
            get(|State(state), headers, Path(ids)| read_of(ISSUER, state, headers, ids))
                .patch(update_issuer)
                .delete(archive_issuer),
        )
        .route(
            "/v1/zones/{zone_id}/grants",
            get(list_grants).post(create_grant),
        )
        .route(
            "/v1/zones/{zone_id}/grants/{id}",
            get(|State(state), headers, Path(ids)| read_of(GRANT, state, headers, ids))
                .delete(revoke_grant),
        )
        .route(
            "/v1/zones/{zone_id}/workloads",
            get(|State(state), headers, Path(zone), RawQuery(raw)| {
                list_of(WORKLOAD, state, headers, zone, raw)
            })
            .post(create_workload),
        )
        .route(
            "/v1/zones/{zone_id}/workloads/{id}",
            get(|State(state), headers, Path(ids)| read_of(WORKLOAD, state, headers, ids))
                .put(update_workload)
                .delete(delete_workload),
        )
        .route(
            "/v1/zones/{zone_id}/workloads/{id}/rotate-secret",
            post(rotate_workload_secret),
        )
        .route(
            "/v1/zones/{zone_id}/workloads/{id}/secret",
            get(reveal_workload_secret),
        )
}

/// The object as the API shows it: its body without private keys, with its identity and times.
fn shown(object: &AdminObject) -> Value {
    let mut fields: Map<String, Value> = serde_json::from_str(&object.body).unwrap_or_default();
    fields.retain(|key, _| !key.starts_with(PRIVATE_PREFIX));
    fields.insert("id".into(), json!(object.id));
    fields.insert("zone_id".into(), json!(object.zone_id));
    fields.insert("status".into(), json!(object.status));
    fields.insert("created_at".into(), json!(timestamp(object.created_at_ms)));
    fields.insert("updated_at".into(), json!(timestamp(object.updated_at_ms)));
    Value::Object(fields)
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::with_description(ErrorCode::NotFound, format!("{what} `{id}` not found"))
}

async fn found(
    state: &RoleState,
    zone_id: &str,
    kind: &str,
    id: &str,
) -> Result<AdminObject, ApiError> {
    let what = kind.replace('_', " ");
    match state
        .shared
        .store
        .get_admin_object(zone_id, kind, id)
        .await?
    {
        Some(object) if object.status != "archived" => Ok(object),
        _ => Err(not_found(&what, id)),
    }
}

/// `GET` of a kind's list: a page of the zone's objects, newest first.
async fn list_of(
    kind: &'static str,
    state: RoleState,
    headers: HeaderMap,
    zone_id: String,
    raw: Option<String>,
) -> Result<Json<Page<Value>>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query = super::list_query(raw.as_deref())?;
    listed(&state, &zone_id, kind, &query, |_| true).await
}

/// `GET` of one object of a kind.
async fn read_of(
    kind: &'static str,
    state: RoleState,
    headers: HeaderMap,
    (zone_id, id): (String, String),
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    Ok(Json(shown(&found(&state, &zone_id, kind, &id).await?)))
}

/// A page of the zone's objects of `kind` that `keep` admits, newest first.
async fn listed(
    state: &RoleState,
    zone_id: &str,
    kind: &str,
    query: &ListQuery,
    keep: impl Fn(&AdminObject) -> bool,
) -> Result<Json<Page<Value>>, ApiError> {
    let rows: Vec<AdminObject> = state
        .shared
        .store
        .list_admin_objects(zone_id, kind)
        .await?
        .into_iter()
        .filter(|object| object.status != "archived" && keep(object))
        .collect();
    let page = page(
        rows,
        |object| (object.created_at_ms, object.id.clone()),
        query,
        |object| shown(&object),
    )?;
    Ok(Json(page))
}

fn change<'a>(
    zone_id: &'a str,
    action: &'static str,
    entity_type: &'static str,
    id: &'a str,
    fields: Vec<&'static str>,
) -> Change<'a> {
    Change {
        zone_id,
        action,
        entity_type,
        entity_id: id,
        fields,
    }
}

/// An `https://` URL with a host, at most 2048 bytes.
fn https_url(path: &str, text: &str) -> Result<String, ApiError> {
    let uri = text.parse::<http::Uri>().ok().filter(|uri| {
        uri.scheme_str() == Some("https") && uri.host().is_some_and(|host| !host.is_empty())
    });
    match uri {
        Some(_) if text.len() <= 2048 => Ok(text.to_owned()),
        _ => Err(invalid_body(path, "must be an https:// URL")),
    }
}

fn bounded(path: &str, text: &str, max: usize) -> Result<String, ApiError> {
    let text = text.trim();
    if text.is_empty() || text.chars().count() > max || text.chars().any(char::is_control) {
        return Err(invalid_body(
            path,
            &format!("must be 1 to {max} printable characters"),
        ));
    }
    Ok(text.to_owned())
}

// ---- subject issuers ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuerRequest {
    issuer: Option<String>,
    jwks_url: Option<String>,
    audience: Option<String>,
}

fn issuer_conflict(issuer: &str) -> ApiError {
    ApiError::with_description(
        ErrorCode::SubjectIssuerConflict,
        format!("the zone already trusts issuer `{issuer}`"),
    )
}

/// The issuer's fields after `request` is applied over `current`; all three must end up set.
fn issuer_fields(
    request: IssuerRequest,
    current: &Map<String, Value>,
) -> Result<Map<String, Value>, ApiError> {
    let field = |name: &str, given: Option<String>| {
        given.or_else(|| current.get(name).and_then(Value::as_str).map(str::to_owned))
    };
    let issuer = field("issuer", request.issuer)
        .ok_or_else(|| invalid_body("issuer", "required"))
        .and_then(|issuer| https_url("issuer", &issuer))?;
    let jwks_url = field("jwks_url", request.jwks_url)
        .ok_or_else(|| invalid_body("jwks_url", "required"))
        .and_then(|url| https_url("jwks_url", &url))?;
    let audience = field("audience", request.audience)
        .ok_or_else(|| invalid_body("audience", "required"))
        .and_then(|audience| bounded("audience", &audience, 512))?;
    let mut fields = Map::new();
    fields.insert("issuer".into(), json!(issuer));
    fields.insert("jwks_url".into(), json!(jwks_url));
    fields.insert("audience".into(), json!(audience));
    Ok(fields)
}

async fn create_issuer(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let fields = issuer_fields(json(&raw)?, &Map::new())?;
    let issuer = fields
        .get("issuer")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let now = now_ms();
    let object = AdminObject {
        zone_id: zone_id.clone(),
        kind: ISSUER.into(),
        id: new_id(),
        unique_key: Some(issuer.clone()),
        status: "active".into(),
        body: Value::Object(fields).to_string(),
        created_at_ms: now,
        updated_at_ms: now,
    };
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        change(
            &zone_id,
            "subject_issuer.create",
            "subject_issuer",
            &object.id,
            vec!["issuer", "jwks_url", "audience"],
        ),
    )?;
    let store = state.shared.store.as_ref();
    match store
        .insert_admin_object(&object, Some(MAX_ISSUERS), &[evidence])
        .await
    {
        Ok(()) => Ok((StatusCode::CREATED, Json(shown(&object)))),
        // At the limit the count refuses first; a duplicate is still named as one.
        Err(StoreError::LimitReached(_) | StoreError::Conflict(_)) => {
            let taken = store
                .list_admin_objects(&zone_id, ISSUER)
                .await?
                .iter()
                .any(|other| {
                    other.status == "active" && other.unique_key.as_deref() == Some(&issuer)
                });
            Err(if taken {
                issuer_conflict(&issuer)
            } else {
                ApiError::with_description(
                    ErrorCode::ZoneLimitExceeded,
                    format!("a zone trusts at most {MAX_ISSUERS} subject issuers"),
                )
            })
        }
        Err(other) => Err(other.into()),
    }
}

async fn update_issuer(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: IssuerRequest = json(&raw)?;
    let mut object = found(&state, &zone_id, ISSUER, &id).await?;
    let changed: Vec<&'static str> = [
        ("issuer", request.issuer.is_some()),
        ("jwks_url", request.jwks_url.is_some()),
        ("audience", request.audience.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, given)| given.then_some(name))
    .collect();
    let fields = issuer_fields(request, &object.fields())?;
    let issuer = fields
        .get("issuer")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    object.unique_key = Some(issuer.clone());
    object.body = Value::Object(fields).to_string();
    object.updated_at_ms = now_ms();
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        change(
            &zone_id,
            "subject_issuer.update",
            "subject_issuer",
            &id,
            changed,
        ),
    )?;
    state
        .shared
        .store
        .update_admin_object(&object, &[evidence])
        .await
        .map_err(super::on_conflict(issuer_conflict(&issuer)))?;
    Ok(Json(shown(&object)))
}

async fn archive_issuer(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let mut object = found(&state, &zone_id, ISSUER, &id).await?;
    object.status = "archived".into();
    object.updated_at_ms = now_ms();
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        change(
            &zone_id,
            "subject_issuer.archive",
            "subject_issuer",
            &id,
            vec![],
        ),
    )?;
    state
        .shared
        .store
        .update_admin_object(&object, &[evidence])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- grants ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantRequest {
    application_id: String,
    user_id: String,
    resource_id: String,
    scopes: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantQuery {
    application_id: Option<String>,
    user_id: Option<String>,
    subject_id: Option<String>,
    resource_id: Option<String>,
    provider_id: Option<String>,
    status: Option<String>,
    /// Comma-separated: grants holding every one.
    scopes: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

fn valid_scope(scope: &str) -> bool {
    !scope.is_empty()
        && scope.len() <= 128
        && scope.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || b":_./-".contains(&byte)
        })
}

async fn list_grants(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<Value>>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query: GrantQuery = crate::api::query(raw.as_deref())?;
    let user = query.user_id.clone().or(query.subject_id.clone());
    let scopes: Vec<String> = query
        .scopes
        .as_deref()
        .map(|scopes| scopes.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let page_query = ListQuery {
        limit: query.limit,
        cursor: query.cursor.clone(),
        status: None,
    };
    listed(&state, &zone_id, GRANT, &page_query, |object| {
        let body = object.fields();
        let is = |name: &str, wanted: &Option<String>| {
            wanted
                .as_deref()
                .is_none_or(|wanted| body.get(name).and_then(Value::as_str) == Some(wanted))
        };
        let held: Vec<&str> = body
            .get("scopes")
            .and_then(Value::as_array)
            .map(|scopes| scopes.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        is("application_id", &query.application_id)
            && is("user_id", &user)
            && is("resource_id", &query.resource_id)
            && is("provider_id", &query.provider_id)
            && query
                .status
                .as_deref()
                .is_none_or(|status| object.status == status)
            && scopes.iter().all(|scope| held.contains(&scope.as_str()))
    })
    .await
}

async fn create_grant(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: GrantRequest = json(&raw)?;
    let user_id = bounded("user_id", &request.user_id, 512)?;
    if request.scopes.is_empty() || request.scopes.len() > 64 {
        return Err(invalid_body("scopes", "1 to 64 scopes"));
    }
    if let Some(bad) = request.scopes.iter().find(|scope| !valid_scope(scope)) {
        return Err(invalid_body(
            "scopes",
            &format!("`{bad}` is not a scope (a-z 0-9 : _ . / -)"),
        ));
    }
    let application =
        super::applications::live_application(&state, &zone_id, &request.application_id).await?;
    let store = state.shared.store.as_ref();
    let resource = match store.get_resource(&zone_id, &request.resource_id).await? {
        Some(resource) => Some(resource),
        None => store.find_resource(&zone_id, &request.resource_id).await?,
    }
    .filter(|resource| resource.archived_at_ms.is_none())
    .ok_or_else(|| not_found("resource", &request.resource_id))?;
    if let Some(extra) = request
        .scopes
        .iter()
        .find(|scope| !resource.scopes.contains(scope))
    {
        return Err(invalid_body(
            "scopes",
            &format!("`{extra}` is not a scope of `{}`", resource.identifier),
        ));
    }
    let mut scopes = request.scopes;
    scopes.sort();
    scopes.dedup();
    let now = now_ms();
    let object = AdminObject {
        zone_id: zone_id.clone(),
        kind: GRANT.into(),
        id: new_id(),
        unique_key: None,
        status: "active".into(),
        body: json!({
            "application_id": application.id,
            "user_id": user_id,
            "subject_id": user_id,
            "resource_id": resource.id,
            "resource_identifier": resource.identifier,
            "provider_id": resource.provider_id,
            "scopes": scopes,
        })
        .to_string(),
        created_at_ms: now,
        updated_at_ms: now,
    };
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        change(
            &zone_id,
            "grant.create",
            "grant",
            &object.id,
            vec!["application_id", "user_id", "resource_id", "scopes"],
        ),
    )?;
    store
        .insert_admin_object(&object, None, &[evidence])
        .await?;
    Ok((StatusCode::CREATED, Json(shown(&object))))
}

/// Revokes the grant and, first, every authority path of its user (records, sessions riding
/// them, their delegations), with the revocation messages, as the subject kill switch does.
async fn revoke_grant(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let mut object = found(&state, &zone_id, GRANT, &id).await?;
    if object.status == "revoked" {
        return Ok(StatusCode::NO_CONTENT);
    }
    let user = object
        .fields()
        .get("user_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    // Evidence first: the revocation is recorded before it is applied.
    let event = super::audit_event(
        &caller,
        request_id.as_deref(),
        change(&zone_id, "grant.revoke", "grant", &id, vec!["status"]),
    );
    super::record_now(&state, event).await?;
    let store = state.shared.store.as_ref();
    store
        .revoke_subject(
            &zone_id,
            &user,
            "grant_revoked",
            crate::propagation::revocations,
        )
        .await?;
    object.status = "revoked".into();
    object.updated_at_ms = now_ms();
    store.update_admin_object(&object, &[]).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- workloads ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateWorkload {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateWorkload {
    name: Option<String>,
    bindings: Option<Vec<Binding>>,
}

use crate::sts::run::Binding;

fn check_bindings(bindings: &[Binding]) -> Result<(), ApiError> {
    if bindings.len() > 64 {
        return Err(invalid_body("bindings", "at most 64 bindings"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (n, binding) in bindings.iter().enumerate() {
        let path = format!("bindings[{n}]");
        let env = &binding.env;
        if let Err(problem) = crate::sts::run::check_env_name(env) {
            return Err(invalid_body(&format!("{path}.env"), &problem));
        }
        if !seen.insert(env.clone()) {
            return Err(invalid_body(
                &format!("{path}.env"),
                &format!("`{env}` is bound twice"),
            ));
        }
        bounded(&format!("{path}.resource"), &binding.resource, 512)?;
        if binding.scopes.len() > 32 || binding.scopes.iter().any(|scope| !valid_scope(scope)) {
            return Err(invalid_body(
                &format!("{path}.scopes"),
                "at most 32 scopes (a-z 0-9 : _ . / -)",
            ));
        }
        if !matches!(binding.on_failure.as_str(), "warn" | "error") {
            return Err(invalid_body(
                &format!("{path}.on_failure"),
                "must be warn or error",
            ));
        }
    }
    Ok(())
}

fn workload_conflict(name: &str) -> ApiError {
    ApiError::with_description(
        ErrorCode::WorkloadNameConflict,
        format!("a workload named `{name}` exists in this zone"),
    )
}

/// A fresh `ws_` secret: its hash and its sealed copy go in the body, the clear text back to
/// the caller once.
async fn new_workload_secret(
    state: &RoleState,
    body: &mut Map<String, Value>,
) -> Result<String, ApiError> {
    let (secret, hash) = super::applications::new_secret("ws_").await?;
    let sealed = state
        .shared
        .kek
        .seal(SEAL_PURPOSE, secret.as_bytes())
        .map_err(|error| {
            tracing::error!(%error, "sealing a workload secret failed");
            ApiError::new(ErrorCode::InternalError)
        })?;
    body.insert("_secret_hash".into(), json!(hash));
    body.insert("_sealed_secret".into(), json!(sealed));
    body.insert("_kek_id".into(), json!(state.shared.kek.key_id()));
    Ok(secret)
}

fn with_secret(object: &AdminObject, secret: String) -> Value {
    let mut shown = shown(object);
    if let Some(fields) = shown.as_object_mut() {
        fields.insert("secret".into(), json!(secret));
    }
    shown
}

async fn create_workload(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: CreateWorkload = json(&raw)?;
    let name = super::valid_name(&request.name)?;
    let mut body = Map::new();
    body.insert("name".into(), json!(name));
    body.insert("bindings".into(), json!([]));
    let secret = new_workload_secret(&state, &mut body).await?;
    let now = now_ms();
    let object = AdminObject {
        zone_id: zone_id.clone(),
        kind: WORKLOAD.into(),
        id: new_id(),
        unique_key: Some(name.to_lowercase()),
        status: "active".into(),
        body: Value::Object(body).to_string(),
        created_at_ms: now,
        updated_at_ms: now,
    };
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        change(
            &zone_id,
            "workload.create",
            "workload",
            &object.id,
            vec!["name", "secret"],
        ),
    )?;
    state
        .shared
        .store
        .insert_admin_object(&object, None, &[evidence])
        .await
        .map_err(super::on_conflict(workload_conflict(&name)))?;
    Ok((StatusCode::CREATED, Json(with_secret(&object, secret))))
}

async fn update_workload(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: UpdateWorkload = json(&raw)?;
    let mut object = found(&state, &zone_id, WORKLOAD, &id).await?;
    let mut body = object.fields();
    let mut fields = Vec::new();
    let mut name = body
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if let Some(new_name) = &request.name {
        name = super::valid_name(new_name)?;
        body.insert("name".into(), json!(name));
        fields.push("name");
    }
    if let Some(bindings) = &request.bindings {
        check_bindings(bindings)?;
        body.insert("bindings".into(), json!(bindings));
        fields.push("bindings");
    }
    object.unique_key = Some(name.to_lowercase());
    object.body = Value::Object(body).to_string();
    object.updated_at_ms = now_ms();
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        change(&zone_id, "workload.update", "workload", &id, fields),
    )?;
    state
        .shared
        .store
        .update_admin_object(&object, &[evidence])
        .await
        .map_err(super::on_conflict(workload_conflict(&name)))?;
    Ok(Json(shown(&object)))
}

async fn rotate_workload_secret(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let mut object = found(&state, &zone_id, WORKLOAD, &id).await?;
    let mut body = object.fields();
    let secret = new_workload_secret(&state, &mut body).await?;
    object.body = Value::Object(body).to_string();
    object.updated_at_ms = now_ms();
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        change(
            &zone_id,
            "workload.rotate_secret",
            "workload",
            &id,
            vec!["secret"],
        ),
    )?;
    state
        .shared
        .store
        .update_admin_object(&object, &[evidence])
        .await?;
    Ok(Json(with_secret(&object, secret)))
}

/// The workload's secret in clear: write capability, and recorded before it is returned.
async fn reveal_workload_secret(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let caller: AdminCaller = authenticate(&state, &headers).await?;
    live_zone(&state, &caller, &zone_id, Access::Write).await?;
    let object = found(&state, &zone_id, WORKLOAD, &id).await?;
    let sealed = object
        .fields()
        .get("_sealed_secret")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| ApiError::new(ErrorCode::ClientSecretNotStored))?;
    let secret = state
        .shared
        .kek
        .open(SEAL_PURPOSE, &sealed)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| {
            tracing::error!(workload = %id, "a workload's sealed secret does not open");
            ApiError::new(ErrorCode::InternalError)
        })?;
    let event = super::audit_event(
        &caller,
        request_id.as_deref(),
        change(
            &zone_id,
            "workload.reveal_secret",
            "workload",
            &id,
            vec!["secret"],
        ),
    );
    super::record_now(&state, event).await?;
    Ok(Json(json!({ "id": id, "secret": secret })))
}

async fn delete_workload(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    found(&state, &zone_id, WORKLOAD, &id).await?;
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        change(&zone_id, "workload.delete", "workload", &id, vec![]),
    )?;
    state
        .shared
        .store
        .delete_admin_object(&zone_id, WORKLOAD, &id, &[evidence])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
