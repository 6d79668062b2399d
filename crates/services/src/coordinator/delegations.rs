//! `/zones/{zone}/delegations`: a session hands part of its authority to another session.
//! Every edge narrows: its scopes lie within its resources' scopes and its parent edge's, its
//! resources within its parent's, its expiry before its parent's, its hop budget below its
//! parent's. A refusal names the rule. Revoking an edge takes its descendants and the sessions
//! they target down with it, in one transaction.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use caracal_core::ErrorCode;
use caracal_store::{DelegationEdge, OutboxMessage, now_ms};
use http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{DELEGATIONS_INVALIDATE, authenticate, invalid, timestamp, valid_id};
use crate::auth::Access;
use crate::constraints::{Constraints, MAX_HOPS};
use crate::error::ApiError;
use crate::state::RoleState;

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/zones/{zone_id}/delegations", post(create))
        .route(
            "/zones/{zone_id}/delegations/{id}",
            get(read).delete(revoke),
        )
        // The SDK's `revoke_delegation` sends this form.
        .route("/zones/{zone_id}/delegations/{id}/revoke", patch(revoke))
        .route("/zones/{zone_id}/delegations/{id}/impact", get(impact))
        .route("/zones/{zone_id}/delegations/{id}/traverse", get(traverse))
        .route("/zones/{zone_id}/delegations/active", get(active))
        .route(
            "/zones/{zone_id}/delegations/inbound/{session_id}",
            get(inbound),
        )
        // The SDK's `accept_delegation(validate=True)`: is this handed-over edge mine and live?
        .route(
            "/zones/{zone_id}/delegations/inbound/{session_id}/{id}",
            get(inbound_one),
        )
        .route(
            "/zones/{zone_id}/delegations/outbound/{session_id}",
            get(outbound),
        )
}

const MAX_TTL_SECONDS: i64 = 86_400;

fn widening(rule: &str) -> ApiError {
    ApiError::with_description(ErrorCode::DelegationExceedsParentAuthority, rule.to_owned())
}

fn not_found(id: &str) -> ApiError {
    ApiError::with_description(
        ErrorCode::DelegationNotFound,
        format!("delegation `{id}` not found"),
    )
}

/// An edge as the Coordinator (and the admin API's read view) shows it.
pub(crate) fn body(edge: &DelegationEdge) -> Value {
    let constraints = Constraints::parse(&edge.constraints).unwrap_or_default();
    json!({
        "delegation_edge_id": edge.id,
        "id": edge.id,
        "zone_id": edge.zone_id,
        "source_session_id": edge.source_session_id,
        "target_session_id": edge.target_session_id,
        "issuer_application_id": edge.issuer_application_id,
        "receiver_application_id": edge.receiver_application_id,
        "parent_edge_id": edge.parent_edge_id,
        "resource_id": edge.resource_id,
        "scopes": edge.scopes,
        "constraints": serde_json::from_str::<Value>(&edge.constraints).unwrap_or(Value::Null),
        "max_hops": constraints.max_hops(),
        "status": edge.status,
        "expires_at": edge.expires_at_ms.map(timestamp),
        "created_at": timestamp(edge.created_at_ms),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateEdge {
    issuer_application_id: String,
    source_session_id: String,
    target_session_id: String,
    receiver_application_id: String,
    scopes: Vec<String>,
    #[serde(default)]
    resource_id: Option<String>,
    #[serde(default)]
    parent_edge_id: Option<String>,
    #[serde(default)]
    ttl_seconds: Option<i64>,
    #[serde(default)]
    constraints: Option<serde_json::Map<String, Value>>,
}

/// The resources an edge reaches: its own (by id), or its constraint list (by identifier);
/// `None` is a broad edge.
fn reach(edge_resource: Option<&str>, constraints: &Constraints) -> Option<Vec<String>> {
    match edge_resource {
        Some(resource) => Some(vec![resource.to_owned()]),
        None if constraints.resources.is_empty() => None,
        None => Some(constraints.resources.clone()),
    }
}

#[allow(clippy::too_many_lines)]
async fn create(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<axum::Extension<caracal_core::RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &zone_id).await?;
    let canonical: Value =
        serde_json::from_slice(&raw).map_err(|error| invalid(format!("invalid body: {error}")))?;
    let request: CreateEdge = serde_json::from_value(canonical.clone())
        .map_err(|error| invalid(format!("invalid body: {error}")))?;
    let key = super::idempotency::from_request(
        &state,
        &headers,
        "delegation.create",
        &zone_id,
        &caller.client_id,
        &canonical,
    )?;
    if let Some(key) = &key {
        let store = state.shared.store.as_ref();
        let replay = super::idempotency::replay(&state, key, async |id: &str| {
            Ok(store
                .get_delegation_edge(&zone_id, id)
                .await?
                .is_some_and(|edge| edge.live(now_ms())))
        })
        .await?;
        if let Some(replay) = replay {
            return Ok(replay);
        }
    }
    if request.issuer_application_id != caller.client_id {
        return Err(ApiError::with_description(
            ErrorCode::ParentOwnershipRequired,
            "a delegation is issued by the caller's own application",
        ));
    }
    for id in [&request.source_session_id, &request.target_session_id]
        .into_iter()
        .chain(request.parent_edge_id.as_ref())
    {
        if !valid_id(id) {
            return Err(invalid(format!("`{id}` has an invalid id syntax")));
        }
    }
    if request.source_session_id == request.target_session_id {
        return Err(invalid("a session cannot delegate to itself"));
    }
    let mut scopes = request.scopes.clone();
    scopes.sort();
    scopes.dedup();
    if scopes.is_empty() || scopes.iter().any(|scope| scope.trim().is_empty()) {
        return Err(invalid("scopes must be a non-empty list of scopes"));
    }
    if scopes.iter().any(|scope| scope == "agent:lifecycle") {
        return Err(widening("agent:lifecycle cannot be delegated"));
    }
    let constraints_text =
        Value::Object(request.constraints.clone().unwrap_or_default()).to_string();
    let constraints = Constraints::parse(&constraints_text).ok_or_else(|| {
        invalid("constraints: unknown key, bad type, more than 64 resources, max_hops above 10, or max_depth ≠ max_hops")
    })?;
    let now = now_ms();
    // An expiry is mandatory: ttl_seconds, constraints.expires_at, or both (the earlier wins).
    let by_ttl = match request.ttl_seconds {
        None => None,
        Some(ttl) if (1..=MAX_TTL_SECONDS).contains(&ttl) => Some(now + ttl * 1000),
        Some(_) => return Err(invalid("ttl_seconds must be 1 to 86400")),
    };
    let by_constraint = match constraints.expires_at_ms() {
        None => None,
        Some(Some(at)) if at > now => Some(at),
        Some(_) => {
            return Err(invalid(
                "constraints.expires_at must be a future RFC 3339 time",
            ));
        }
    };
    let expires_at_ms = match (by_ttl, by_constraint) {
        (Some(a), Some(b)) => a.min(b),
        (Some(at), None) | (None, Some(at)) => at,
        (None, None) => {
            return Err(ApiError::with_description(
                ErrorCode::DelegationExpiryRequired,
                "an expiry is required: ttl_seconds or constraints.expires_at",
            ));
        }
    };

    let store = state.shared.store.as_ref();
    let (source, target) = (
        store
            .get_session(&zone_id, &request.source_session_id)
            .await?,
        store
            .get_session(&zone_id, &request.target_session_id)
            .await?,
    );
    let source = source.filter(|session| session.live(now)).ok_or_else(|| {
        ApiError::with_description(
            ErrorCode::SessionNotFound,
            "the source session is not active",
        )
    })?;
    let target = target.filter(|session| session.live(now)).ok_or_else(|| {
        ApiError::with_description(
            ErrorCode::SessionNotFound,
            "the target session is not active",
        )
    })?;
    if source.application_id != request.issuer_application_id
        || target.application_id != request.receiver_application_id
    {
        return Err(ApiError::with_description(
            ErrorCode::DelegationApplicationMismatch,
            "the sessions' applications are not the issuer and receiver named",
        ));
    }

    // The resources, which must exist; the scopes within theirs. No resources: a broad edge,
    // which needs a permission no caller holds yet.
    let resource_row_id = match &request.resource_id {
        None => None,
        Some(resource) => Some(
            store
                .find_resource(&zone_id, resource)
                .await?
                .filter(|row| row.archived_at_ms.is_none())
                .ok_or_else(|| invalid(format!("resource `{resource}` not found")))?,
        ),
    };
    let mut reachable_scopes: Vec<String> = Vec::new();
    if let Some(row) = &resource_row_id {
        reachable_scopes.extend(row.scopes.iter().cloned());
    }
    for identifier in &constraints.resources {
        let row = store
            .find_resource(&zone_id, identifier)
            .await?
            .filter(|row| row.archived_at_ms.is_none())
            .ok_or_else(|| invalid(format!("resource `{identifier}` not found")))?;
        reachable_scopes.extend(row.scopes);
    }
    let broad = resource_row_id.is_none() && constraints.resources.is_empty();
    if broad {
        // A resource-less edge reaches every resource: only a caller holding the
        // broad-delegation permission may issue one, and it must say why.
        may_delegate_broadly(&caller)?;
        if constraints
            .broad_reason
            .as_deref()
            .is_none_or(str::is_empty)
        {
            return Err(invalid("a broad delegation needs constraints.broad_reason"));
        }
    } else if let Some(scope) = scopes
        .iter()
        .find(|scope| !reachable_scopes.contains(scope))
    {
        return Err(widening(&format!(
            "scope `{scope}` is not a scope of the delegated resources"
        )));
    }

    // The parent: named, or the one live edge into the source session.
    let parent = match &request.parent_edge_id {
        Some(parent_id) => Some(
            store
                .get_delegation_edge(&zone_id, parent_id)
                .await?
                .ok_or_else(|| not_found(parent_id))?,
        ),
        None => {
            let inbound: Vec<DelegationEdge> = store
                .list_edges_to(&zone_id, &request.source_session_id)
                .await?
                .into_iter()
                .filter(|edge| edge.live(now))
                .collect();
            match inbound.len() {
                0 => None,
                1 => inbound.into_iter().next(),
                _ => {
                    return Err(ApiError::with_description(
                        ErrorCode::ParentDelegationAmbiguous,
                        "the source session has several delegations; name parent_edge_id",
                    ));
                }
            }
        }
    };
    if let Some(parent) = &parent {
        if !parent.live(now) {
            return Err(widening("the parent delegation is not active"));
        }
        if parent.target_session_id != request.source_session_id {
            return Err(widening(
                "the parent delegation does not target the source session",
            ));
        }
        let parent_constraints = Constraints::parse(&parent.constraints).unwrap_or_default();
        if let Some(scope) = scopes.iter().find(|scope| !parent.scopes.contains(scope)) {
            return Err(widening(&format!(
                "scope `{scope}` is not delegated by the parent"
            )));
        }
        if parent.expires_at_ms.is_some_and(|at| expires_at_ms > at) {
            return Err(widening("the delegation would outlive its parent"));
        }
        if let Some(parent_reach) = reach(parent.resource_id.as_deref(), &parent_constraints) {
            // Compare by identifier: an edge names its own resource by row id, its constraint
            // list by identifier.
            let mut allowed = Vec::new();
            for name in &parent_reach {
                if let Some(row) = store.find_resource(&zone_id, name).await? {
                    allowed.push(row.identifier);
                }
            }
            let child: Vec<&str> = resource_row_id
                .iter()
                .map(|row| row.identifier.as_str())
                .chain(constraints.resources.iter().map(String::as_str))
                .collect();
            if let Some(outside) = child
                .iter()
                .find(|name| !allowed.iter().any(|allowed| allowed == *name))
            {
                return Err(widening(&format!(
                    "resource `{outside}` is outside the parent delegation"
                )));
            }
        }
        if parent_constraints.max_hops() < 2
            || constraints.max_hops() > parent_constraints.max_hops() - 1
        {
            return Err(widening(
                "max_hops must be below the parent's, which must allow another hop",
            ));
        }
        if let Some(parent_ttl) = parent_constraints.ttl_seconds
            && constraints.ttl_seconds.is_none_or(|ttl| ttl > parent_ttl)
        {
            return Err(widening(
                "constraints.ttl_seconds must be set and at most the parent's",
            ));
        }
        // No cycles: the target may not appear upstream in the lineage.
        let mut cursor = Some(parent.clone());
        let mut steps = 0;
        while let Some(edge) = cursor {
            if edge.source_session_id == request.target_session_id
                || edge.target_session_id == request.target_session_id
            {
                return Err(ApiError::with_description(
                    ErrorCode::DelegationCycleDenied,
                    "the target session already delegates into this lineage",
                ));
            }
            steps += 1;
            if steps > MAX_HOPS {
                break;
            }
            cursor = match &edge.parent_edge_id {
                Some(id) => store.get_delegation_edge(&zone_id, id).await?,
                None => None,
            };
        }
    }

    let edge = DelegationEdge {
        id: uuid::Uuid::now_v7().to_string(),
        zone_id: zone_id.clone(),
        source_session_id: request.source_session_id,
        target_session_id: request.target_session_id,
        issuer_application_id: request.issuer_application_id,
        receiver_application_id: request.receiver_application_id,
        parent_edge_id: parent.map(|parent| parent.id),
        resource_id: resource_row_id.map(|row| row.id),
        scopes,
        constraints: constraints_text,
        status: "active".to_owned(),
        expires_at_ms: Some(expires_at_ms),
        created_at_ms: now,
        revoked_at_ms: None,
    };
    let created = created(&edge);
    let evidence = super::change_evidence(&super::change_event(
        &super::Caller::Agent(Box::new(caller)),
        &zone_id,
        "delegation.create",
        "delegation",
        &edge.id,
        request_id.as_deref(),
    ))?;
    super::idempotency::create(
        &state,
        key.as_ref(),
        "delegation",
        &edge.id,
        body(&edge),
        async |receipt| {
            store
                .create_delegation_edge_with_receipt(&edge, &[created, evidence], receipt)
                .await
                .map(|_| ())
        },
    )
    .await
}

/// A resource-less (broad) edge is issued, or inherited, only by a caller holding
/// `coordinator.delegate_broad` (or `coordinator.admin`).
fn may_delegate_broadly(caller: &crate::wire::MandateClaims) -> Result<(), ApiError> {
    let permitted = caller.scope.as_deref().is_some_and(|scope| {
        scope
            .split(' ')
            .any(|s| s == "coordinator.delegate_broad" || s == "coordinator.admin")
    });
    if permitted {
        return Ok(());
    }
    Err(ApiError::with_description(
        ErrorCode::BroadDelegationPermissionRequired,
        "a delegation names its resources (resource_id or constraints.resources) unless the caller holds coordinator.delegate_broad",
    ))
}

/// The message that tells every replica a new edge exists.
pub(super) fn created(edge: &DelegationEdge) -> OutboxMessage {
    OutboxMessage {
        stream: DELEGATIONS_INVALIDATE.to_owned(),
        fields: [
            ("zone_id", edge.zone_id.clone()),
            ("event", "edge_create".to_owned()),
            ("edge_id", edge.id.clone()),
            ("source_session_id", edge.source_session_id.clone()),
            ("target_session_id", edge.target_session_id.clone()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect(),
        dedupe_key: None,
    }
}

/// What a child started with `parent_authority=inherit` holds: a copy of its parent's
/// delegation (the one named by `inherit_parent_edge_id`, else the parent's only live inbound
/// edge) from the parent to the child, with the same scopes, resources and expiry, one hop
/// further down the lineage — so its budget is the parent edge's minus one, and a parent edge
/// that allows no further hop cannot be inherited; a broad one only by a caller who could issue
/// one. `None` when the parent holds no delegation.
pub(super) async fn inherited(
    state: &RoleState,
    caller: &crate::wire::MandateClaims,
    parent: &caracal_store::Session,
    named: Option<&str>,
    child_id: &str,
    now: i64,
) -> Result<Option<DelegationEdge>, ApiError> {
    let inbound = state
        .shared
        .store
        .list_edges_to(&parent.zone_id, &parent.id)
        .await?;
    let lapsed = |description: String| {
        ApiError::with_description(ErrorCode::InheritParentEdgeNotActive, description)
    };
    let source = match named {
        Some(id) => inbound
            .into_iter()
            .find(|edge| edge.id == id)
            .filter(|edge| edge.live(now))
            .ok_or_else(|| lapsed(format!("`{id}` is not a live delegation of the parent")))?,
        None => {
            let held = !inbound.is_empty();
            let mut live: Vec<DelegationEdge> =
                inbound.into_iter().filter(|edge| edge.live(now)).collect();
            match live.len() {
                0 if held => return Err(lapsed("the parent's delegation has lapsed".into())),
                0 => return Ok(None),
                1 => live.remove(0),
                _ => {
                    return Err(ApiError::with_description(
                        ErrorCode::InheritParentEdgeAmbiguous,
                        "the parent holds several delegations; name inherit_parent_edge_id",
                    ));
                }
            }
        }
    };
    let parsed = Constraints::parse(&source.constraints)
        .ok_or_else(|| lapsed("the parent's delegation has invalid constraints".into()))?;
    if source.resource_id.is_none() && parsed.resources.is_empty() {
        may_delegate_broadly(caller)?;
    }
    let budget = parsed.max_hops();
    if budget < 2 {
        return Err(widening(
            "the parent's delegation allows no further hop (max_hops 1): start the child with parent_authority none, or delegate to the parent with a larger max_hops",
        ));
    }
    let mut constraints: serde_json::Map<String, Value> =
        serde_json::from_str(&source.constraints).unwrap_or_default();
    for key in ["max_hops", "max_depth"] {
        if key == "max_hops" || constraints.contains_key(key) {
            constraints.insert(key.to_owned(), Value::from(budget - 1));
        }
    }
    Ok(Some(DelegationEdge {
        id: uuid::Uuid::now_v7().to_string(),
        zone_id: parent.zone_id.clone(),
        source_session_id: parent.id.clone(),
        target_session_id: child_id.to_owned(),
        issuer_application_id: parent.application_id.clone(),
        receiver_application_id: parent.application_id.clone(),
        parent_edge_id: Some(source.id),
        resource_id: source.resource_id,
        scopes: source.scopes,
        constraints: Value::Object(constraints).to_string(),
        status: "active".to_owned(),
        expires_at_ms: source.expires_at_ms,
        created_at_ms: now,
        revoked_at_ms: None,
    }))
}

async fn read(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    super::operator_or_agent(&state, &headers, &zone_id, Some(&id), Access::Read).await?;
    let edge = state
        .shared
        .store
        .get_delegation_edge(&zone_id, &id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(body(&edge)))
}

/// The edges into (`inbound`) or out of (`outbound`) a session.
async fn inbound(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, session_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    listing(&state, &headers, &zone_id, &session_id, true).await
}

async fn outbound(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, session_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    listing(&state, &headers, &zone_id, &session_id, false).await
}

async fn listing(
    state: &RoleState,
    headers: &HeaderMap,
    zone_id: &str,
    session_id: &str,
    into: bool,
) -> Result<Json<Value>, ApiError> {
    super::operator_or_agent(state, headers, zone_id, Some(session_id), Access::Read).await?;
    let store = state.shared.store.as_ref();
    let edges = if into {
        store.list_edges_to(zone_id, session_id).await?
    } else {
        store.list_edges_from(zone_id, session_id).await?
    };
    let items: Vec<Value> = edges.iter().map(body).collect();
    // Every edge in one page: the cursor the SDK reads is always at the end.
    Ok(Json(json!({ "items": items, "next_cursor": null })))
}

/// `GET /zones/{zone}/delegations/inbound/{session}/{id}`: the edge, if it targets this session
/// and is live; 404 otherwise, so a receiver never binds to a lapsed or foreign delegation.
async fn inbound_one(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, session_id, id)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let caller =
        super::operator_or_agent(&state, &headers, &zone_id, Some(&session_id), Access::Read)
            .await?;
    let edge = state
        .shared
        .store
        .get_delegation_edge(&zone_id, &id)
        .await?
        .filter(|edge| {
            edge.target_session_id == session_id
                && edge.live(now_ms())
                && (caller.acts_for(&edge.receiver_application_id)
                    || caller.acts_for(&edge.issuer_application_id))
        })
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(body(&edge)))
}

async fn impact(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    super::operator_or_agent(&state, &headers, &zone_id, Some(&id), Access::Read).await?;
    let tree = tree_below(&state, &zone_id, &id).await?;
    Ok(Json(super::impact_body(&tree, Some(&id))))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActiveQuery {
    cursor: Option<String>,
    limit: Option<i64>,
}

/// `GET /zones/{zone}/delegations/active`: the zone's live edges by id, a page at a time
/// (`limit` 1 to 500, default 100; `next_cursor` is the last id of a full page). An agent sees
/// the edges its application issued or receives; an operator sees every edge.
async fn active(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
    query: Result<Query<ActiveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = super::operator_or_agent(&state, &headers, &zone_id, None, Access::Read).await?;
    let Query(query) = query.map_err(|error| invalid(error.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(invalid("limit must be 1 to 500"));
    }
    if let Some(cursor) = query.cursor.as_deref().filter(|cursor| !valid_id(cursor)) {
        return Err(invalid(format!("`{cursor}` is not a cursor")));
    }
    let page = state
        .shared
        .store
        .page_delegation_edges(&zone_id, Some("active"), query.cursor.as_deref(), limit)
        .await?;
    let next_cursor = (i64::try_from(page.len()).unwrap_or(i64::MAX) == limit)
        .then(|| page.last().map(|edge| edge.id.clone()))
        .flatten();
    let now = now_ms();
    let items: Vec<Value> = page
        .iter()
        .filter(|edge| edge.live(now))
        .filter(|edge| {
            caller.acts_for(&edge.issuer_application_id)
                || caller.acts_for(&edge.receiver_application_id)
        })
        .map(body)
        .collect();
    Ok(Json(json!({ "items": items, "next_cursor": next_cursor })))
}

/// What revoking edge `id` would take down, without taking it.
async fn tree_below(
    state: &RoleState,
    zone_id: &str,
    id: &str,
) -> Result<caracal_store::TerminatedTree, ApiError> {
    state
        .shared
        .store
        .delegation_tree_impact(zone_id, id)
        .await
        .map_err(|error| match error {
            caracal_store::StoreError::NotFound(_) => not_found(id),
            other => other.into(),
        })
}

/// `GET /zones/{zone}/delegations/{id}/traverse`: the edges downstream of this one that its
/// revocation would take down (itself first), as a list.
async fn traverse(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    super::operator_or_agent(&state, &headers, &zone_id, Some(&id), Access::Read).await?;
    let tree = tree_below(&state, &zone_id, &id).await?;
    let store = state.shared.store.as_ref();
    let mut ids: Vec<&str> = vec![id.as_str()];
    ids.extend(
        tree.edges
            .iter()
            .map(|(edge, _)| edge.as_str())
            .filter(|edge| *edge != id),
    );
    // One read for the tree, then the edge itself first and the rest in the tree's order.
    let mut edges: std::collections::HashMap<String, _> = store
        .get_delegation_edges(&zone_id, &ids)
        .await?
        .into_iter()
        .map(|edge| (edge.id.clone(), edge))
        .collect();
    let nodes = ids
        .iter()
        .filter_map(|edge_id| edges.remove(*edge_id))
        .map(|edge| body(&edge))
        .collect();
    Ok(Json(Value::Array(nodes)))
}

/// `DELETE /zones/{zone}/delegations/{id}` (or `PATCH …/revoke`): the edge, its descendants
/// and the sessions they target (with their subtrees), in one transaction with their revocation
/// messages. Answers what went down: `{revoked_edges, affected_sessions, terminated_sessions}`
/// (empty when the edge was already revoked).
async fn revoke(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<axum::Extension<caracal_core::RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let caller =
        super::operator_or_agent(&state, &headers, &zone_id, Some(&id), Access::Write).await?;
    let store = state.shared.store.as_ref();
    let edge = store
        .get_delegation_edge(&zone_id, &id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    if !caller.acts_for(&edge.issuer_application_id) {
        return Err(ApiError::with_description(
            ErrorCode::ParentOwnershipRequired,
            "only the issuing application revokes a delegation",
        ));
    }
    if edge.status == "active" {
        super::record_change(
            &state,
            super::change_event(
                &caller,
                &zone_id,
                "delegation.revoke",
                "delegation",
                &id,
                request_id.as_deref(),
            ),
        )
        .await?;
    }
    let tree = store
        .revoke_delegation_tree(&zone_id, &id, "delegation_revoked", super::revocations)
        .await
        .map_err(|error| match error {
            caracal_store::StoreError::NotFound(_) => not_found(&id),
            other => other.into(),
        })?;
    let terminated: Vec<&str> = tree.sessions.iter().map(|(id, _)| id.as_str()).collect();
    // The revoked edges' targets, and everything terminated below them.
    let mut affected: Vec<&str> = tree
        .edges
        .iter()
        .map(|(_, target)| target.as_str())
        .collect();
    affected.extend(&terminated);
    affected.sort_unstable();
    affected.dedup();
    Ok(Json(json!({
        "revoked_edges": tree.edges.iter().map(|(edge, _)| edge).collect::<Vec<_>>(),
        "affected_sessions": affected,
        "terminated_sessions": terminated,
        "graph_epoch": tree.epoch,
    })))
}
