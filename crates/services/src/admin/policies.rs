//! Policies (Rego data documents, versioned and immutable) and policy sets (versioned
//! manifests with canary cases), activation through the outbox, activation status, simulate,
//! and rollback to the last known good version.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use caracal_policy::{Bundle, Diagnostic, Request};
use caracal_store::{OutboxMessage, PolicyHeader, PolicyVersion, now_ms};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Change, evidence, invalid_body, json, list_query, new_id, on_conflict, page, timestamp,
    valid_name,
};
use crate::auth::{Access, authenticate};
use crate::error::ApiError;
use crate::policy::{
    BundleError, Canary, ManifestEntry, POLICY_INVALIDATE, SetVersionContent, compile_document,
    compile_manifest,
};
use crate::state::RoleState;
use crate::wire::Page;

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/policies/validate", post(validate))
        .route("/v1/policy-templates", get(templates))
        .route(
            "/v1/zones/{zone_id}/policies",
            get(list_policies).post(create_policy),
        )
        .route(
            "/v1/zones/{zone_id}/policies/{id}",
            get(read_policy).delete(archive_policy),
        )
        .route(
            "/v1/zones/{zone_id}/policies/{id}/versions",
            post(add_policy_version),
        )
        .route(
            "/v1/zones/{zone_id}/policy-sets",
            get(list_sets).post(create_set),
        )
        .route(
            "/v1/zones/{zone_id}/policy-sets/{id}",
            get(read_set).delete(archive_set),
        )
        .route(
            "/v1/zones/{zone_id}/policy-sets/{id}/versions",
            get(list_set_versions).post(add_set_version),
        )
        .route(
            "/v1/zones/{zone_id}/policy-sets/{id}/versions/{version_id}",
            get(read_set_version),
        )
        .route(
            "/v1/zones/{zone_id}/policy-sets/{id}/activate",
            post(activate),
        )
        .route(
            "/v1/zones/{zone_id}/policy-sets/{id}/activation-status",
            get(activation_status),
        )
        .route(
            "/v1/zones/{zone_id}/policy-sets/{id}/simulate",
            post(simulate),
        )
        .route(
            "/v1/zones/{zone_id}/policy-sets/{id}/rollback",
            post(rollback),
        )
}

const MAX_MANIFEST: usize = 256;
const MAX_CANARIES: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Content {
    content: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreatePolicy {
    name: String,
    description: Option<String>,
    content: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSet {
    name: String,
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSetVersion {
    manifest: Vec<ManifestEntry>,
    #[serde(default)]
    canaries: Vec<Canary>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionChoice {
    version_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimulateBody {
    version_id: String,
    input: Option<Request>,
}

/// `version_id` defaults to the set's active version; `outbox_id` (sent by the published
/// client) is accepted and not needed: the version names its invalidation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusQuery {
    version_id: Option<String>,
    #[allow(
        dead_code,
        reason = "accepted for the published client; the version suffices"
    )]
    outbox_id: Option<String>,
}

fn sha256_hex(text: &str) -> String {
    caracal_crypto::hex(&caracal_crypto::sha256(text.as_bytes()))
}

fn invalid_rego(diagnostics: Vec<Diagnostic>) -> ApiError {
    let summary = diagnostics
        .iter()
        .map(|diagnostic| diagnostic.code.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    ApiError::with_description(
        ErrorCode::InvalidRego,
        format!("not a data document: {summary}"),
    )
    .with_details(json!({ "diagnostics": diagnostics }))
}

fn name_taken(name: &str) -> ApiError {
    ApiError::with_description(
        ErrorCode::PolicyNameConflict,
        format!("`{name}` exists in this zone"),
    )
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::with_description(ErrorCode::NotFound, format!("{what} `{id}` not found"))
}

fn version_body(version: &PolicyVersion) -> Value {
    json!({
        "id": version.id,
        "version_id": version.id,
        "version": version.version,
        "content_sha256": version.sha256,
        "content": version.content,
        "created_at": timestamp(version.created_at_ms),
    })
}

async fn validate(
    State(state): State<RoleState>,
    headers: HeaderMap,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    caller.require(Access::Read, super::token_zone(&caller))?;
    let request: Content = json(&raw)?;
    let document = compile_document(request.content)
        .await
        .map_err(invalid_rego)?;
    Ok(Json(json!({
        "valid": true,
        "schema_version": caracal_policy::SCHEMA_VERSION,
        "input_schema_version": caracal_policy::SCHEMA_VERSION,
        "output_contract": "caracal.authz.result",
        "preview": {
            "package": "caracal.authz",
            "rules": document.rules.keys().collect::<Vec<_>>(),
            "default_result": "deny",
        },
    })))
}

async fn templates(
    State(state): State<RoleState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    caller.require(Access::Read, super::token_zone(&caller))?;
    let template = |id: &str, description: &str, body: &str| {
        json!({
            "id": id,
            "name": id,
            "description": description,
            "content": format!("# caracal:data-document\npackage caracal.authz\nimport rego.v1\n\n{body}\n"),
        })
    };
    Ok(Json(json!([
        template(
            "application-bindings",
            "Name applications with binding keys the other rules refer to.",
            "app_ids := {\"billing\": \"<application-id>\"}",
        ),
        template(
            "resource-grants",
            "Grant an application's roles scopes on a resource.",
            "grants := {\"resource://ledger\": {\"application\": \"billing\", \"roles\": {\"<application-id>\": [\"ledger:read\"]}}}",
        ),
        template(
            "label-confinement",
            "Confine sessions whose labels start with a prefix to a subset of scopes.",
            "confinement := [{\"label_prefix\": \"intern-\", \"scopes\": [\"ledger:read\"]}]",
        ),
        template(
            "zone-restriction",
            "While any reason is listed, every request in the zone is denied.",
            "restrict := [\"incident-response\"]",
        ),
    ])))
}

async fn live_policy(state: &RoleState, zone_id: &str, id: &str) -> Result<PolicyHeader, ApiError> {
    match state.shared.store.get_policy(zone_id, id).await? {
        Some(policy) if policy.archived_at_ms.is_none() => Ok(policy),
        _ => Err(not_found("policy", id)),
    }
}

async fn live_set(state: &RoleState, zone_id: &str, id: &str) -> Result<PolicyHeader, ApiError> {
    match state.shared.store.get_policy_set(zone_id, id).await? {
        Some(set) if set.archived_at_ms.is_none() => Ok(set),
        _ => Err(not_found("policy set", id)),
    }
}

async fn list_policies(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<Value>>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query = list_query(raw.as_deref())?;
    let policies: Vec<PolicyHeader> = state
        .shared
        .store
        .list_policies(&zone_id)
        .await?
        .into_iter()
        .filter(|policy| policy.archived_at_ms.is_none())
        .collect();
    Ok(Json(page(
        policies,
        |p| (p.created_at_ms, p.id.clone()),
        &query,
        |row| header_body(&row),
    )?))
}

/// `base` with `extra`'s fields added (both objects).
fn merged(mut base: Value, extra: Value) -> Value {
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    base
}

fn header_body(header: &PolicyHeader) -> Value {
    json!({
        "id": header.id,
        "zone_id": header.zone_id,
        "name": header.name,
        "description": header.description,
        "created_at": timestamp(header.created_at_ms),
    })
}

async fn create_policy(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: CreatePolicy = json(&raw)?;
    let name = valid_name(&request.name)?;
    compile_document(request.content.clone())
        .await
        .map_err(invalid_rego)?;
    let header = PolicyHeader {
        id: new_id(),
        zone_id: zone_id.clone(),
        name: name.clone(),
        description: request.description.unwrap_or_default(),
        created_at_ms: now_ms(),
        archived_at_ms: None,
    };
    let created = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "policy.create",
            entity_type: "policy",
            entity_id: &header.id,
            fields: vec!["name", "description"],
        },
    )?;
    state
        .shared
        .store
        .create_policy(&header, &[created])
        .await
        .map_err(on_conflict(name_taken(&name)))?;
    let version = store_policy_version(
        &state,
        &caller,
        request_id.as_deref(),
        &zone_id,
        &header.id,
        &request.content,
    )
    .await?;
    let body = merged(
        header_body(&header),
        json!({
            "version_id": version.id,
            "version": version.version,
            "content_sha256": version.sha256,
            "versions": [version_body(&version)],
        }),
    );
    Ok((StatusCode::CREATED, Json(body)))
}

async fn store_policy_version(
    state: &RoleState,
    caller: &crate::auth::AdminCaller,
    request_id: Option<&RequestId>,
    zone_id: &str,
    policy_id: &str,
    content: &str,
) -> Result<PolicyVersion, ApiError> {
    let id = new_id();
    let recorded = evidence(
        caller,
        request_id,
        Change {
            zone_id,
            action: "policy.version_create",
            entity_type: "policy_version",
            entity_id: &id,
            fields: vec!["content"],
        },
    )?;
    Ok(state
        .shared
        .store
        .add_policy_version(
            zone_id,
            policy_id,
            &id,
            content,
            &sha256_hex(content),
            &[recorded],
        )
        .await?)
}

async fn read_policy(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let policy = live_policy(&state, &zone_id, &id).await?;
    let versions = state
        .shared
        .store
        .list_policy_versions(&zone_id, &id)
        .await?;
    let versions: Vec<Value> = versions.iter().map(version_body).collect();
    Ok(Json(merged(
        header_body(&policy),
        json!({ "versions": versions }),
    )))
}

async fn add_policy_version(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: Content = json(&raw)?;
    live_policy(&state, &zone_id, &id).await?;
    compile_document(request.content.clone())
        .await
        .map_err(invalid_rego)?;
    let version = store_policy_version(
        &state,
        &caller,
        request_id.as_deref(),
        &zone_id,
        &id,
        &request.content,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(version_body(&version))))
}

async fn set_body(state: &RoleState, set: &PolicyHeader) -> Result<Value, ApiError> {
    let binding = state.shared.store.policy_binding(&set.zone_id).await?;
    let mine = binding.filter(|binding| binding.policy_set_id == set.id);
    Ok(merged(
        header_body(set),
        json!({
            "active_version_id": mine.as_ref().map(|b| b.active_version_id.clone()),
            "last_known_good_version_id": mine.and_then(|b| b.previous_version_id),
        }),
    ))
}

async fn list_sets(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<Value>>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query = list_query(raw.as_deref())?;
    let sets: Vec<PolicyHeader> = state
        .shared
        .store
        .list_policy_sets(&zone_id)
        .await?
        .into_iter()
        .filter(|set| set.archived_at_ms.is_none())
        .collect();
    let page = page(sets, |s| (s.created_at_ms, s.id.clone()), &query, |set| set)?;
    let mut items = Vec::with_capacity(page.items.len());
    for set in &page.items {
        items.push(set_body(&state, set).await?);
    }
    Ok(Json(Page {
        items,
        next_cursor: page.next_cursor,
    }))
}

async fn create_set(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: CreateSet = json(&raw)?;
    let name = valid_name(&request.name)?;
    let set = PolicyHeader {
        id: new_id(),
        zone_id: zone_id.clone(),
        name: name.clone(),
        description: request.description.unwrap_or_default(),
        created_at_ms: now_ms(),
        archived_at_ms: None,
    };
    let recorded = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "policy_set.create",
            entity_type: "policy_set",
            entity_id: &set.id,
            fields: vec!["name", "description"],
        },
    )?;
    state
        .shared
        .store
        .create_policy_set(&set, &[recorded])
        .await
        .map_err(on_conflict(name_taken(&name)))?;
    Ok((StatusCode::CREATED, Json(set_body(&state, &set).await?)))
}

async fn read_set(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let set = live_set(&state, &zone_id, &id).await?;
    Ok(Json(set_body(&state, &set).await?))
}

fn set_version_body(version: &PolicyVersion) -> Value {
    let content: Value = serde_json::from_str(&version.content).unwrap_or(Value::Null);
    let part = |key: &str| content.get(key).cloned().unwrap_or(Value::Null);
    json!({
        "id": version.id,
        "version_id": version.id,
        "policy_set_id": version.parent_id,
        "version": version.version,
        "manifest_sha256": version.sha256,
        "manifest": part("manifest"),
        "canaries": part("canaries"),
        "created_at": timestamp(version.created_at_ms),
    })
}

async fn list_set_versions(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<Value>>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    live_set(&state, &zone_id, &id).await?;
    let query = list_query(raw.as_deref())?;
    let versions = state
        .shared
        .store
        .list_policy_set_versions(&zone_id, &id)
        .await?;
    Ok(Json(page(
        versions,
        |v| (v.version, v.id.clone()),
        &query,
        |row| set_version_body(&row),
    )?))
}

async fn set_version(
    state: &RoleState,
    zone_id: &str,
    set_id: &str,
    version_id: &str,
) -> Result<PolicyVersion, ApiError> {
    match state
        .shared
        .store
        .get_policy_set_version(zone_id, version_id)
        .await?
    {
        Some(version) if version.parent_id == set_id => Ok(version),
        _ => Err(not_found("policy set version", version_id)),
    }
}

async fn read_set_version(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id, version_id)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let version = set_version(&state, &zone_id, &id, &version_id).await?;
    Ok(Json(set_version_body(&version)))
}

/// Compiles the documents a manifest names (all of this zone) into one bundle.
async fn bundle_of(
    state: &RoleState,
    zone_id: &str,
    manifest: &[ManifestEntry],
) -> Result<Bundle, ApiError> {
    compile_manifest(state.shared.store.as_ref(), zone_id, manifest)
        .await
        .map_err(|error| match error {
            BundleError::Store(error) => error.into(),
            BundleError::MissingVersion(id) => not_found("policy version", &id),
            other => ApiError::with_description(ErrorCode::InvalidPolicyBundle, other.to_string())
                .with_details(json!({ "diagnostics": other.diagnostics() })),
        })
}

fn content_of(version: &PolicyVersion) -> Result<SetVersionContent, ApiError> {
    crate::policy::set_version_content(version).map_err(|error| {
        tracing::error!(%error, "a stored policy set version does not parse");
        ApiError::new(ErrorCode::InternalError)
    })
}

async fn add_set_version(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: CreateSetVersion = json(&raw)?;
    live_set(&state, &zone_id, &id).await?;
    if request.manifest.is_empty() || request.manifest.len() > MAX_MANIFEST {
        return Err(invalid_body(
            "manifest",
            &format!("must name 1 to {MAX_MANIFEST} policy versions"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    if !request
        .manifest
        .iter()
        .all(|entry| seen.insert(entry.policy_version_id.as_str()))
    {
        return Err(invalid_body("manifest", "names a policy version twice"));
    }
    if request.canaries.len() > MAX_CANARIES {
        return Err(invalid_body("canaries", &format!("at most {MAX_CANARIES}")));
    }
    bundle_of(&state, &zone_id, &request.manifest).await?;
    let manifest_json = serde_json::to_string(&request.manifest)
        .map_err(|_| ApiError::new(ErrorCode::InternalError))?;
    let content = serde_json::to_string(&SetVersionContent {
        manifest: request.manifest,
        canaries: request.canaries,
    })
    .map_err(|_| ApiError::new(ErrorCode::InternalError))?;
    let version_id = new_id();
    let recorded = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "policy_set.version_create",
            entity_type: "policy_set_version",
            entity_id: &version_id,
            fields: vec!["manifest", "canaries"],
        },
    )?;
    let version = state
        .shared
        .store
        .add_policy_set_version(
            &zone_id,
            &id,
            &version_id,
            &content,
            &sha256_hex(&manifest_json),
            &[recorded],
        )
        .await?;
    Ok((StatusCode::CREATED, Json(set_version_body(&version))))
}

/// Runs a version's canary cases against its bundle; the failures, if any.
fn failed_canaries(bundle: &Bundle, canaries: &[Canary]) -> Vec<Value> {
    canaries
        .iter()
        .filter_map(|canary| {
            let decision = caracal_policy::decide(Some(bundle), &canary.request);
            (decision.decision != canary.expect).then(|| {
                json!({
                    "name": canary.name,
                    "expected": canary.expect,
                    "got": decision.decision,
                    "reason": decision.reason(),
                })
            })
        })
        .collect()
}

/// Activates `version` of `set`: compiles it, runs its canaries, then makes it the zone's
/// active version with its invalidation message and evidence in the same transaction.
async fn activate_version(
    state: &RoleState,
    caller: &crate::auth::AdminCaller,
    request_id: Option<&RequestId>,
    set: &PolicyHeader,
    version: &PolicyVersion,
    action: &'static str,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let content = content_of(version)?;
    let bundle = bundle_of(state, &set.zone_id, &content.manifest).await?;
    let failures = failed_canaries(&bundle, &content.canaries);
    if !failures.is_empty() {
        state.metrics.policy_canary_failures.inc();
        return Err(ApiError::with_description(
            ErrorCode::CanaryFailed,
            format!(
                "{} canary case(s) disagree; nothing was activated",
                failures.len()
            ),
        )
        .with_details(json!({ "failures": failures })));
    }
    let invalidate = OutboxMessage {
        stream: POLICY_INVALIDATE.to_owned(),
        fields: [
            ("zone_id".to_owned(), set.zone_id.clone()),
            ("policy_set_id".to_owned(), set.id.clone()),
            ("policy_set_version_id".to_owned(), version.id.clone()),
            ("manifest_sha256".to_owned(), version.sha256.clone()),
        ]
        .into(),
        dedupe_key: Some(activation_key(&version.id)),
    };
    let recorded = evidence(
        caller,
        request_id,
        Change {
            zone_id: &set.zone_id,
            action,
            entity_type: "policy_set_version",
            entity_id: &version.id,
            fields: vec!["active_version_id"],
        },
    )?;
    let store = state.shared.store.as_ref();
    let binding = if action == "policy_set.rollback" {
        store
            .rollback_policy_set_version(&set.zone_id, &version.id, &[invalidate, recorded])
            .await
            .map_err(|error| match error {
                // Another activation or rollback moved the binding meanwhile.
                caracal_store::StoreError::NotFound(_) => ApiError::new(ErrorCode::NoLastKnownGood),
                other => other.into(),
            })?
    } else {
        store
            .activate_policy_set_version(&set.zone_id, &version.id, &[invalidate, recorded])
            .await?
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "activated": true,
            "policy_set_id": set.id,
            "version_id": version.id,
            "last_known_good_version_id": binding.previous_version_id,
            "status_url": format!(
                "/v1/zones/{}/policy-sets/{}/activation-status?version_id={}",
                set.zone_id, set.id, version.id
            ),
        })),
    ))
}

fn activation_key(version_id: &str) -> String {
    format!("policy-activate:{version_id}")
}

async fn activate(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    super::incident::refuse_when_frozen(&state)?;
    let request: VersionChoice = json(&raw)?;
    let set = live_set(&state, &zone_id, &id).await?;
    let version = set_version(&state, &zone_id, &id, &request.version_id).await?;
    activate_version(
        &state,
        &caller,
        request_id.as_deref(),
        &set,
        &version,
        "policy_set.activate",
    )
    .await
}

/// Re-activates the zone's last known good version (the one the current version replaced).
async fn rollback(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let set = live_set(&state, &zone_id, &id).await?;
    let binding = state.shared.store.policy_binding(&zone_id).await?;
    let previous = binding
        .filter(|binding| binding.policy_set_id == id)
        .and_then(|binding| binding.previous_version_id)
        .ok_or_else(|| {
            ApiError::with_description(
                ErrorCode::NoLastKnownGood,
                "this set has no earlier active version to return to",
            )
        })?;
    let version = set_version(&state, &zone_id, &id, &previous).await?;
    activate_version(
        &state,
        &caller,
        request_id.as_deref(),
        &set,
        &version,
        "policy_set.rollback",
    )
    .await
}

/// Where an activation stands: `waiting_for_activation` (not the active version),
/// `waiting_for_outbox` (invalidation not yet published), `waiting_for_sts` (published, no STS
/// replica has acknowledged it yet), `loaded` (an STS replica loaded it), `failed` (the
/// invalidation is dead, or an STS replica refused the bundle and kept the previous one).
async fn activation_status(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    live_set(&state, &zone_id, &id).await?;
    let query: StatusQuery = crate::api::query(raw.as_deref())?;
    let binding = state.shared.store.policy_binding(&zone_id).await?;
    let active = binding
        .as_ref()
        .filter(|binding| binding.policy_set_id == id)
        .map(|binding| binding.active_version_id.clone());
    let version_id = query.version_id.or_else(|| active.clone()).ok_or_else(|| {
        ApiError::with_description(
            ErrorCode::InvalidRequest,
            "`version_id` is required: the set has no active version",
        )
    })?;
    set_version(&state, &zone_id, &id, &version_id).await?;
    let outbox = state
        .shared
        .store
        .outbox_status(&activation_key(&version_id))
        .await?;
    let loads: Vec<caracal_store::PolicyLoad> = state
        .shared
        .store
        .policy_loads(&zone_id)
        .await?
        .into_iter()
        .filter(|load| load.policy_set_version_id == version_id)
        .collect();
    let loaded = loads.iter().any(|load| load.status == "loaded");
    let failed = loads.iter().find(|load| load.status == "failed");
    let is_active = active.as_deref() == Some(version_id.as_str());
    let propagation = match (is_active, outbox.as_deref()) {
        (false, _) => "waiting_for_activation",
        (true, Some("dead")) => "failed",
        (true, _) if failed.is_some() => "failed",
        (true, _) if loaded => "loaded",
        (true, Some("published")) => "waiting_for_sts",
        (true, _) => "waiting_for_outbox",
    };
    Ok(Json(json!({
        "policy_set_id": id,
        "version_id": version_id,
        "active_version_id": active,
        "outbox_status": outbox,
        "sts_status": {
            "loaded_replicas": loads.iter().filter(|load| load.status == "loaded").count(),
            "failure": failed.map(|load| load.detail.clone()),
        },
        "propagation_status": propagation,
    })))
}

/// Evaluates a request against any version without activating it. It changes nothing, so a
/// read token may simulate.
async fn simulate(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let request: SimulateBody = json(&raw)?;
    live_set(&state, &zone_id, &id).await?;
    let version = set_version(&state, &zone_id, &id, &request.version_id).await?;
    let content = content_of(&version)?;
    let bundle = bundle_of(&state, &zone_id, &content.manifest).await?;
    // Without an input the version is only compiled (as the published client allows).
    let decision = request
        .input
        .as_ref()
        .map(|input| caracal_policy::decide(Some(&bundle), input));
    Ok(Json(json!({
        "explanation": {
            "evaluation": if decision.is_some() { "executed" } else { "not_executed" },
        },
        "dry_run": true,
        "policy_set_id": id,
        "version_id": version.id,
        "manifest_sha256": version.sha256,
        "schema_version": caracal_policy::SCHEMA_VERSION,
        "result": decision,
    })))
}

async fn archive_policy(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    live_policy(&state, &zone_id, &id).await?;
    let recorded = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "policy.archive",
            entity_type: "policy",
            entity_id: &id,
            fields: vec![],
        },
    )?;
    state
        .shared
        .store
        .archive_policy(&zone_id, &id, &[recorded])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Archives a set. If it is the zone's active set, the zone drops to deny-all at once: the
/// binding goes in the same transaction and the STS is told to reload.
async fn archive_set(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    live_set(&state, &zone_id, &id).await?;
    let recorded = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "policy_set.archive",
            entity_type: "policy_set",
            entity_id: &id,
            fields: vec![],
        },
    )?;
    let invalidate = OutboxMessage {
        stream: POLICY_INVALIDATE.to_owned(),
        fields: [
            ("zone_id".to_owned(), zone_id.clone()),
            ("policy_set_id".to_owned(), id.clone()),
        ]
        .into(),
        dedupe_key: Some(format!("policy-archive:{id}")),
    };
    state
        .shared
        .store
        .archive_policy_set(&zone_id, &id, &[invalidate, recorded])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
