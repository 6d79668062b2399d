//! `/v1/zones/{zone}/resources`: the `resource://…` audiences agents call through the Gateway,
//! each bound to a credential provider of its zone.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::get;
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use caracal_store::{Resource, now_ms};
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};

use super::providers::live_provider;
use super::{
    Change, evidence, invalid_body, json, list_query, live_zone, new_id, on_conflict, page,
    slug_of, timestamp, valid_name,
};
use crate::auth::{Access, authenticate};
use crate::error::ApiError;
use crate::state::RoleState;
use crate::wire::{Page, ResourceBody};

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/zones/{zone_id}/resources", get(list).post(create))
        .route(
            "/v1/zones/{zone_id}/resources/{id}",
            get(read).patch(update).delete(archive),
        )
}

const MAX_SCOPES: usize = 64;
const MAX_SCOPE: usize = 128;
const MAX_OPERATIONS: usize = 256;
const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];
const ENFORCEMENTS: [&str; 2] = ["enforced", "transport_uniform"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SaveResource {
    name: Option<String>,
    identifier: Option<String>,
    scopes: Option<Vec<String>>,
    upstream_url: Option<String>,
    credential_provider_id: Option<String>,
    operations: Option<Vec<Operation>>,
    operation_enforcement: Option<String>,
}

/// One Gateway operation: a method and path that need a scope.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Operation {
    method: String,
    path: String,
    scope: String,
}

fn body(resource: Resource) -> ResourceBody {
    ResourceBody {
        operations: serde_json::from_str(&resource.operations).unwrap_or_default(),
        id: resource.id,
        zone_id: resource.zone_id,
        name: resource.name,
        identifier: resource.identifier,
        scopes: resource.scopes,
        upstream_url: resource.upstream_url,
        credential_provider_id: resource.provider_id,
        operation_enforcement: resource.operation_enforcement,
        created_at: timestamp(resource.created_at_ms),
        archived_at: resource.archived_at_ms.map(timestamp),
    }
}

fn valid_identifier(identifier: &str) -> Result<String, ApiError> {
    let rest = identifier.strip_prefix("resource://").unwrap_or_default();
    let well_formed = !rest.is_empty()
        && rest.len() <= 200
        && rest
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"._~:/-".contains(&byte));
    if !well_formed {
        return Err(invalid_body(
            "identifier",
            "must be resource:// followed by 1 to 200 of A-Z a-z 0-9 . _ ~ : / -",
        ));
    }
    Ok(identifier.to_owned())
}

fn valid_scopes(scopes: Vec<String>) -> Result<Vec<String>, ApiError> {
    if scopes.is_empty() || scopes.len() > MAX_SCOPES {
        return Err(invalid_body(
            "scopes",
            &format!("must hold 1 to {MAX_SCOPES} scopes"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for scope in &scopes {
        let well_formed = !scope.is_empty()
            && scope.len() <= MAX_SCOPE
            && scope.bytes().all(|byte| {
                byte.is_ascii_lowercase() || byte.is_ascii_digit() || b":_./-".contains(&byte)
            });
        if !well_formed {
            return Err(invalid_body(
                "scopes",
                &format!("`{scope}` is not a scope (a-z 0-9 : _ . / -, at most {MAX_SCOPE})"),
            ));
        }
        if scope == "agent:lifecycle" {
            return Err(invalid_body(
                "scopes",
                "`agent:lifecycle` is reserved for sessions",
            ));
        }
        if !seen.insert(scope.as_str()) {
            return Err(invalid_body("scopes", &format!("`{scope}` is repeated")));
        }
    }
    Ok(scopes)
}

fn valid_upstream(url: &str) -> Result<String, ApiError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or_default();
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || url.len() > 2048 || url.contains(['?', '#', ' ']) || !url.is_ascii() {
        return Err(invalid_body(
            "upstream_url",
            "must be an http:// or https:// URL without query or fragment",
        ));
    }
    Ok(url.to_owned())
}

fn valid_operations(operations: Vec<Operation>, scopes: &[String]) -> Result<String, ApiError> {
    if operations.len() > MAX_OPERATIONS {
        return Err(invalid_body(
            "operations",
            &format!("at most {MAX_OPERATIONS}"),
        ));
    }
    for operation in &operations {
        if !METHODS.contains(&operation.method.as_str()) {
            return Err(invalid_body(
                "operations",
                &format!(
                    "method `{}` is not one of {}",
                    operation.method,
                    METHODS.join(", ")
                ),
            ));
        }
        let path_ok = operation.path.starts_with('/')
            && operation.path.len() <= 512
            && !operation.path.contains(['?', '#'])
            && operation.path.bytes().all(|byte| byte.is_ascii_graphic());
        if !path_ok {
            return Err(invalid_body(
                "operations",
                &format!(
                    "path `{}` must start with / and hold no query",
                    operation.path
                ),
            ));
        }
        if !scopes.contains(&operation.scope) {
            return Err(invalid_body(
                "operations",
                &format!(
                    "scope `{}` is not one of the resource's scopes",
                    operation.scope
                ),
            ));
        }
    }
    serde_json::to_string(&operations).map_err(|_| ApiError::new(ErrorCode::InternalError))
}

fn valid_enforcement(enforcement: Option<String>) -> Result<String, ApiError> {
    let enforcement = enforcement.unwrap_or_else(|| "enforced".to_owned());
    if !ENFORCEMENTS.contains(&enforcement.as_str()) {
        return Err(invalid_body(
            "operation_enforcement",
            "must be enforced or transport_uniform",
        ));
    }
    Ok(enforcement)
}

fn identifier_taken(identifier: &str) -> ApiError {
    ApiError::with_description(
        ErrorCode::ResourceIdentifierConflict,
        format!("a resource `{identifier}` exists in this zone"),
    )
}

pub(super) async fn live_resource(
    state: &RoleState,
    zone_id: &str,
    id: &str,
) -> Result<Resource, ApiError> {
    match state.shared.store.get_resource(zone_id, id).await? {
        Some(resource) if resource.archived_at_ms.is_none() => Ok(resource),
        _ => Err(ApiError::with_description(
            ErrorCode::NotFound,
            format!("resource `{id}` not found"),
        )),
    }
}

async fn list(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<ResourceBody>>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query = list_query(raw.as_deref())?;
    let resources: Vec<Resource> = state
        .shared
        .store
        .list_resources(&zone_id)
        .await?
        .into_iter()
        .filter(|resource| resource.archived_at_ms.is_none())
        .collect();
    Ok(Json(page(
        resources,
        |r| (r.created_at_ms, r.id.clone()),
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
) -> Result<(StatusCode, Json<ResourceBody>), ApiError> {
    let caller = authenticate(&state, &headers).await?;
    super::incident::refuse_when_frozen(&state)?;
    live_zone(&state, &caller, &zone_id, Access::Write).await?;
    let request: SaveResource = json(&raw)?;
    let (name, identifier) = match (request.name, request.identifier) {
        (None, None) => return Err(invalid_body("name", "a name or an identifier is required")),
        (name, Some(identifier)) => {
            let identifier = valid_identifier(&identifier)?;
            let name =
                name.unwrap_or_else(|| identifier.trim_start_matches("resource://").to_owned());
            (name, identifier)
        }
        (Some(name), None) => {
            let identifier = format!("resource://{}", slug_of(&name, 200, "resource"));
            (name, identifier)
        }
    };
    let name = valid_name(&name)?;
    let scopes = valid_scopes(
        request
            .scopes
            .ok_or_else(|| invalid_body("scopes", "is required"))?,
    )?;
    let provider_id = request
        .credential_provider_id
        .ok_or_else(|| ApiError::new(ErrorCode::CredentialProviderRequired))?;
    let upstream_url = valid_upstream(
        &request
            .upstream_url
            .ok_or_else(|| ApiError::new(ErrorCode::UpstreamUrlRequired))?,
    )?;
    let operations = valid_operations(request.operations.unwrap_or_default(), &scopes)?;
    let operation_enforcement = valid_enforcement(request.operation_enforcement)?;
    live_provider(&state, &zone_id, &provider_id).await?;
    let id = new_id();
    let resource = Resource {
        id: id.clone(),
        zone_id: zone_id.clone(),
        name,
        identifier,
        upstream_url,
        provider_id,
        scopes,
        operations,
        operation_enforcement,
        created_at_ms: now_ms(),
        archived_at_ms: None,
    };
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "resource.create",
            entity_type: "resource",
            entity_id: &id,
            fields: vec![
                "name",
                "identifier",
                "scopes",
                "upstream_url",
                "credential_provider_id",
                "operations",
                "operation_enforcement",
            ],
        },
    )?;
    state
        .shared
        .store
        .save_resource(&resource, &[evidence])
        .await
        .map_err(on_conflict(identifier_taken(&resource.identifier)))?;
    Ok((StatusCode::CREATED, Json(body(resource))))
}

async fn read(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<ResourceBody>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    Ok(Json(body(live_resource(&state, &zone_id, &id).await?)))
}

async fn update(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<ResourceBody>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    super::incident::refuse_when_frozen(&state)?;
    live_zone(&state, &caller, &zone_id, Access::Write).await?;
    let request: SaveResource = json(&raw)?;
    let current = live_resource(&state, &zone_id, &id).await?;
    let mut fields = Vec::new();
    let mut next = current.clone();
    if let Some(name) = request.name {
        fields.push("name");
        next.name = valid_name(&name)?;
    }
    if let Some(identifier) = request.identifier {
        fields.push("identifier");
        next.identifier = valid_identifier(&identifier)?;
    }
    if let Some(scopes) = request.scopes {
        fields.push("scopes");
        next.scopes = valid_scopes(scopes)?;
    }
    if let Some(url) = request.upstream_url {
        fields.push("upstream_url");
        next.upstream_url = valid_upstream(&url)?;
    }
    if let Some(provider_id) = request.credential_provider_id {
        fields.push("credential_provider_id");
        live_provider(&state, &zone_id, &provider_id).await?;
        next.provider_id = provider_id;
    }
    let operations = match request.operations {
        Some(operations) => {
            fields.push("operations");
            operations
        }
        None => serde_json::from_str(&current.operations).unwrap_or_default(),
    };
    // Operations are re-checked against the (possibly narrowed) scopes.
    next.operations = valid_operations(operations, &next.scopes)?;
    if request.operation_enforcement.is_some() {
        fields.push("operation_enforcement");
        next.operation_enforcement = valid_enforcement(request.operation_enforcement)?;
    }
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "resource.update",
            entity_type: "resource",
            entity_id: &id,
            fields,
        },
    )?;
    state
        .shared
        .store
        .save_resource(&next, &[evidence])
        .await
        .map_err(on_conflict(identifier_taken(&next.identifier)))?;
    Ok(Json(body(next)))
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
    live_resource(&state, &zone_id, &id).await?;
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "resource.archive",
            entity_type: "resource",
            entity_id: &id,
            fields: vec![],
        },
    )?;
    state
        .shared
        .store
        .archive_resource(&zone_id, &id, &[evidence])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
