//! Remote automation: `POST /v1/control/invoke` on the API role, what the published
//! `caracalai_admin.ControlClient` calls. A control key (an application holding `control:invoke`
//! and `control:scope:` traits) mints a one-use `use=resource` mandate for the control audience
//! at the STS, then runs one command of a fixed catalog with it. The command runs through the
//! admin API's own routes, in process, as a caller confined to the key's zone that reads, or
//! writes when its scope is a write or delete scope: every check, limit and audit event of
//! those routes applies. `ensure <kind>` is a list, then a create or a change, on those routes;
//! `state plan|verify|apply` is that for a document of objects.
//!
//! Order of checks, each failing closed: enabled, evidence intact, the mandate (signature, time,
//! issuer, audience, `use`), the key still live with the mandate's scopes still granted, the
//! zone not failed closed by an incident containment, the mandate unspent (one use), the key's budget, the catalog and the scope the command needs,
//! the flags; then the decision is recorded durably, and only then does the command run.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use caracal_audit::Event;
use caracal_bus::ReplayNamespace;
use caracal_core::{RequestId, Role};
use caracal_store::now_ms;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tower::ServiceExt as _;

use crate::auth::AdminCaller;
use crate::keys::KeyRing;
use crate::state::RoleState;
use crate::sts::control::{AUDIENCE, is_control_key, key_expired, key_scopes};
use crate::wire::MandateClaims;

/// Flags per invocation, and items per array flag.
pub const MAX_FLAGS: usize = 32;
pub const MAX_FLAG_ITEMS: usize = 64;
/// Invocations a minute per control key, across replicas.
pub const INVOKES_PER_MINUTE: u64 = 60;
const INVOKE_WINDOW: Duration = Duration::from_secs(60);
/// Longest `authorized_by`, in characters.
const MAX_AUTHORIZED_BY: usize = 200;

/// What the API role holds for control invocations.
pub struct Control {
    /// Invocations are refused (503 `control_disabled`) unless the operator turned them on.
    pub enabled: bool,
    pub issuer: String,
    pub keys: KeyRing,
    /// The admin API's routes, with their layers, and the Coordinator's, built once.
    admin: OnceLock<Router>,
    coordinator: OnceLock<Router>,
}

impl Control {
    pub fn new(enabled: bool, issuer: String) -> Arc<Control> {
        Arc::new(Control {
            enabled,
            issuer,
            keys: KeyRing::default(),
            admin: OnceLock::new(),
            coordinator: OnceLock::new(),
        })
    }
}

pub fn routes() -> Router<RoleState> {
    Router::new().route("/v1/control/invoke", post(invoke))
}

/// One catalog entry: the command, its subcommand, and the route it runs: on the admin API
/// (under `/v1/zones/{zone}/`, or from the root when the path starts with `/`) or on the
/// Coordinator's operator routes (under `/zones/{zone}/`); `{id}` is the `id` flag.
struct Entry {
    command: &'static str,
    subcommand: &'static str,
    method: &'static str,
    path: &'static str,
    coordinator: bool,
}

const fn entry(
    command: &'static str,
    subcommand: &'static str,
    method: &'static str,
    path: &'static str,
) -> Entry {
    Entry {
        command,
        subcommand,
        method,
        path,
        coordinator: false,
    }
}

/// A Coordinator operator route.
const fn operator(
    command: &'static str,
    subcommand: &'static str,
    method: &'static str,
    path: &'static str,
) -> Entry {
    Entry {
        coordinator: true,
        ..entry(command, subcommand, method, path)
    }
}

/// Every command a control key can run. Not here, on purpose: admin tokens, zones, signing
/// keys, approval decisions, secret reveals and incident actions stay with operators.
const CATALOG: &[Entry] = &[
    entry("app", "list", "GET", "applications"),
    entry("app", "get", "GET", "applications/{id}"),
    entry("app", "create", "POST", "applications"),
    entry("app", "patch", "PATCH", "applications/{id}"),
    entry(
        "app",
        "rotate-secret",
        "POST",
        "applications/{id}/rotate-secret",
    ),
    entry("app", "delete", "DELETE", "applications/{id}"),
    entry("resource", "list", "GET", "resources"),
    entry("resource", "get", "GET", "resources/{id}"),
    entry("resource", "create", "POST", "resources"),
    entry("resource", "patch", "PATCH", "resources/{id}"),
    entry("resource", "delete", "DELETE", "resources/{id}"),
    entry("identity-provider", "list", "GET", "providers"),
    entry("identity-provider", "get", "GET", "providers/{id}"),
    entry("identity-provider", "create", "POST", "providers"),
    entry("identity-provider", "patch", "PATCH", "providers/{id}"),
    entry("identity-provider", "delete", "DELETE", "providers/{id}"),
    entry("workload", "list", "GET", "workloads"),
    entry("workload", "get", "GET", "workloads/{id}"),
    entry("workload", "create", "POST", "workloads"),
    entry("workload", "patch", "PUT", "workloads/{id}"),
    entry(
        "workload",
        "rotate-secret",
        "POST",
        "workloads/{id}/rotate-secret",
    ),
    entry("workload", "delete", "DELETE", "workloads/{id}"),
    entry("policy", "list", "GET", "policies"),
    entry("policy", "get", "GET", "policies/{id}"),
    entry("policy", "create", "POST", "policies"),
    entry("policy", "version", "POST", "policies/{id}/versions"),
    entry("policy", "validate", "POST", "/v1/policies/validate"),
    entry("policy", "delete", "DELETE", "policies/{id}"),
    entry("policy-set", "list", "GET", "policy-sets"),
    entry("policy-set", "get", "GET", "policy-sets/{id}"),
    entry("policy-set", "create", "POST", "policy-sets"),
    entry("policy-set", "version", "POST", "policy-sets/{id}/versions"),
    entry(
        "policy-set",
        "activate",
        "POST",
        "policy-sets/{id}/activate",
    ),
    entry(
        "policy-set",
        "simulate",
        "POST",
        "policy-sets/{id}/simulate",
    ),
    entry("policy-set", "delete", "DELETE", "policy-sets/{id}"),
    entry("grant", "list", "GET", "grants"),
    entry("grant", "get", "GET", "grants/{id}"),
    entry("grant", "create", "POST", "grants"),
    entry("grant", "revoke", "DELETE", "grants/{id}"),
    entry("authority-record", "list", "GET", "authority-records"),
    entry("approval", "list", "GET", "approvals"),
    entry("audit", "tail", "GET", "audit"),
    entry("audit", "admin", "GET", "admin-audit"),
    entry("audit", "explain", "GET", "audit/explain"),
    entry("session", "list", "GET", "sessions"),
    operator("session", "get", "GET", "agents/{id}"),
    operator("session", "tree", "GET", "agents/{id}/children"),
    operator("session", "suspend", "POST", "agents/{id}/suspend"),
    operator("session", "resume", "POST", "agents/{id}/resume"),
    entry("session", "terminate", "POST", "sessions/{id}/terminate"),
    entry("delegation", "active", "GET", "delegations"),
    operator("delegation", "inbound", "GET", "delegations/inbound/{id}"),
    operator("delegation", "outbound", "GET", "delegations/outbound/{id}"),
    operator("delegation", "traverse", "GET", "delegations/{id}/traverse"),
    operator("delegation", "revoke", "DELETE", "delegations/{id}"),
];

/// `ensure <kind>`: creates the one object of the kind whose key field has the flag's value, or
/// changes the fields that differ; as a catalog entry, the noun whose write scope it needs and
/// the collection it searches and creates in, then the key field.
const ENSURED: &[(&str, Entry, &str)] = &[
    (
        "application",
        entry("app", "ensure", "POST", "applications"),
        "name",
    ),
    (
        "identity-provider",
        entry("identity-provider", "ensure", "POST", "providers"),
        "identifier",
    ),
    (
        "resource",
        entry("resource", "ensure", "POST", "resources"),
        "identifier",
    ),
    (
        "policy",
        entry("policy", "ensure", "POST", "policies"),
        "name",
    ),
    (
        "policy-set",
        entry("policy-set", "ensure", "POST", "policy-sets"),
        "name",
    ),
];

/// Objects a page and pages of a collection `ensure` and `state` read before they give up
/// rather than create a duplicate.
const ENSURE_PAGING: (usize, usize) = (crate::admin::MAX_LIMIT, 20);

/// `read`, `delete` or `write`: the last part of the scope a subcommand needs
/// (`control:<command>:<class>`).
fn class(subcommand: &str) -> &'static str {
    match subcommand {
        "list" | "get" | "tree" | "tail" | "active" | "inbound" | "outbound" | "traverse"
        | "validate" | "simulate" | "admin" | "explain" | "describe" => "read",
        "delete" | "terminate" | "revoke" => "delete",
        _ => "write",
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Invocation {
    command: String,
    subcommand: String,
    #[serde(default)]
    flags: Map<String, Value>,
    authorized_by: Option<String>,
    co_author_operator: Option<bool>,
}

/// A refusal: the status and `{ok: false, error: {code, reason}}`, as the client reads it.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    reason: String,
}

fn refuse(status: StatusCode, code: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        reason: reason.into(),
    }
}

fn unauthorized(reason: impl Into<String>) -> Refusal {
    refuse(StatusCode::UNAUTHORIZED, "unauthorized", reason)
}

fn invalid(reason: impl Into<String>) -> Refusal {
    refuse(StatusCode::BAD_REQUEST, "invalid", reason)
}

/// The bus or the store could not answer a check: refused (invariant 1).
fn unavailable(what: &str) -> Refusal {
    refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        format!("{what} is unavailable; nothing was done"),
    )
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({"ok": false, "error": {"code": self.code, "reason": self.reason}})),
        )
            .into_response();
        let headers = response.headers_mut();
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("60"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

async fn invoke(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    body: Bytes,
) -> Response {
    let request_id = request_id.map(|Extension(id)| id);
    let Some(control) = state.control.clone().filter(|control| control.enabled) else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "control_disabled",
            "control invocations are turned off on this deployment (control.enabled)",
        )
        .into_response();
    };
    if state.shared.evidence.is_lost() {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "audit_unavailable",
            "audit evidence was lost; nothing is invoked until it is recovered",
        )
        .into_response();
    }
    let claims = match authenticate(&state, &control, &headers).await {
        Ok(claims) => claims,
        Err(refusal) => {
            tracing::info!(code = refusal.code, reason = %refusal.reason, "control invocation refused before authentication");
            return refusal.into_response();
        }
    };
    let outcome = Box::pin(run(
        &state,
        &control,
        &headers,
        request_id.as_ref(),
        &claims,
        &body,
    ))
    .await;
    match outcome {
        Ok(response) => response,
        Err((refusal, invocation)) => {
            let event = decision_event(
                &claims,
                request_id.as_ref(),
                invocation.as_ref(),
                Some(&refusal),
            );
            // A denial changes nothing; its event is worth keeping but not worth a 500.
            if let Err(error) = state.shared.evidence.record(event).await {
                tracing::warn!(%error, "a control denial's audit event was not recorded");
            }
            refusal.into_response()
        }
    }
}

/// The bearer: a control mandate of a live control key, verified with its zone's keys.
async fn authenticate(
    state: &RoleState,
    control: &Control,
    headers: &HeaderMap,
) -> Result<MandateClaims, Refusal> {
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| unauthorized("a control mandate is required as the bearer token"))?;
    let zone_id = crate::mandate::claimed_zone(token)
        .filter(|zone| caracal_core::is_plain_id(zone))
        .ok_or_else(|| unauthorized("the bearer is not a mandate"))?;
    let store = state.shared.store.as_ref();
    let keys = match control.keys.zone(store, &state.shared.kek, &zone_id).await {
        Ok(keys) => keys,
        Err(crate::keys::KeyError::Store(error)) => {
            tracing::warn!(%error, "control: zone keys unreadable");
            return Err(unavailable("the store"));
        }
        Err(_) => return Err(unauthorized("not a mandate of a known zone")),
    };
    let now = now_ms();
    let claims = keys
        .verify(token, now)
        .map_err(|error| unauthorized(error.to_string()))?;
    crate::mandate::check_times(&claims, now / 1000)
        .map_err(|error| unauthorized(error.to_string()))?;
    if claims.iss != control.issuer
        || claims.aud != [AUDIENCE]
        || claims.use_ != "resource"
        || claims.sub_type != "application"
        || claims.jti.is_empty()
    {
        return Err(unauthorized("not a control mandate"));
    }
    // Live state: the key still exists, is still a control key, and still holds every scope
    // the mandate carries; its authority record is still active.
    let application = store
        .get_application(&claims.zone_id, &claims.client_id)
        .await
        .map_err(|_| unavailable("the store"))?
        .filter(|application| {
            application.active(now) && is_control_key(application) && !key_expired(application, now)
        })
        .ok_or_else(|| unauthorized("the control key is revoked, archived or expired"))?;
    let granted: Vec<&str> = key_scopes(&application).collect();
    if !scopes(&claims).all(|scope| granted.contains(&scope)) {
        return Err(unauthorized(
            "the control key no longer holds every scope of this mandate",
        ));
    }
    let record_active = store
        .get_authority_record(&claims.zone_id, &claims.sid)
        .await
        .map_err(|_| unavailable("the store"))?
        .is_some_and(|record| record.active(now));
    if !record_active {
        return Err(unauthorized("the mandate's authority record is not active"));
    }
    Ok(claims)
}

fn scopes(claims: &MandateClaims) -> impl Iterator<Item = &str> {
    claims
        .scope
        .as_deref()
        .unwrap_or_default()
        .split(' ')
        .filter(|scope| !scope.is_empty())
}

/// Everything after authentication: a refusal comes back with the invocation (when it parsed)
/// for its audit event.
async fn run(
    state: &RoleState,
    control: &Control,
    headers: &HeaderMap,
    request_id: Option<&RequestId>,
    claims: &MandateClaims,
    body: &[u8],
) -> Result<Response, (Refusal, Option<Invocation>)> {
    // An incident containment of the zone stops automation too (the STS already refuses to
    // mint; this covers mandates minted before the switch).
    if state.shared.containment.fail_closed(&claims.zone_id) {
        return Err((
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "contained",
                "an incident containment refuses automation in this zone",
            ),
            None,
        ));
    }
    let ttl = Duration::from_secs(
        u64::try_from(claims.exp - now_ms() / 1000)
            .unwrap_or(0)
            .max(1),
    );
    match state
        .shared
        .bus
        .replay
        .claim_once(ReplayNamespace::ControlJti, &claims.jti, ttl)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            return Err((
                refuse(
                    StatusCode::UNAUTHORIZED,
                    "token_replay",
                    "this control mandate was already used; mint one per invocation",
                ),
                None,
            ));
        }
        Err(error) => {
            tracing::warn!(%error, "control: replay registry unavailable");
            return Err((unavailable("the replay registry"), None));
        }
    }
    let bucket = format!("control-invokes:{}:{}", claims.zone_id, claims.client_id);
    match state.shared.bus.rates.hit(&bucket, INVOKE_WINDOW).await {
        Ok(count) if count > INVOKES_PER_MINUTE => {
            return Err((
                refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("a control key runs at most {INVOKES_PER_MINUTE} commands a minute"),
                ),
                None,
            ));
        }
        Ok(_) => {}
        Err(error) => {
            tracing::warn!(%error, "control: rate counter unavailable");
            return Err((unavailable("the rate counter"), None));
        }
    }
    let invocation: Invocation =
        serde_json::from_slice(body).map_err(|error| (invalid(format!("body: {error}")), None))?;
    let call = match prepare(headers, claims, &invocation) {
        Ok(call) => call,
        Err(refusal) => return Err((refusal, Some(invocation))),
    };
    let target = if call.coordinator {
        control.coordinator.get_or_init(|| {
            // Operator routes only: what an agent's mandate would need (the issuer, the keys,
            // the limits on new sessions) is never reached from here.
            let mut coordinator = RoleState::new(Role::Coordinator, state.shared.clone());
            coordinator.coordinator = Some(crate::coordinator::start_state(
                control.issuer.clone(),
                crate::coordinator::Limits::default(),
            ));
            crate::coordinator::routes().with_state(coordinator)
        })
    } else {
        control
            .admin
            .get_or_init(|| crate::router::in_process_admin_api(&state.shared))
    }
    .clone();
    let caller = AdminCaller::control_key(&claims.client_id, &claims.zone_id, call.writes);
    // Evidence before action: the decision is durable before the command runs.
    let event = decision_event(claims, request_id, Some(&invocation), None);
    if let Err(error) = state.shared.evidence.record(event).await {
        tracing::warn!(%error, "control: the invocation's audit event was not recorded; refused");
        return Err((
            refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "audit_unavailable",
                "the invocation could not be recorded; nothing was done",
            ),
            Some(invocation),
        ));
    }
    let api = AdminApi {
        router: &target,
        caller,
        request_id,
    };
    let (status, answer) = match &call.work {
        Work::Route { method, path, body } => api.send(method.clone(), path, body.as_ref()).await,
        Work::Ensure(desired) => ensure(&api, desired).await,
        Work::State {
            verb,
            objects,
            prune,
        } => state_run(&api, *verb, objects, *prune).await,
        Work::Describe(listing) => (StatusCode::OK, listing.clone()),
    };
    if status.is_success() {
        return Ok((
            StatusCode::OK,
            [(http::header::CACHE_CONTROL, "no-store")],
            Json(json!({"ok": true, "result": answer})),
        )
            .into_response());
    }
    Err((admin_refusal(status, &answer), Some(invocation)))
}

/// An invocation resolved against the catalog: the admin route to call and what to send.
struct Call {
    writes: bool,
    /// Runs on the Coordinator's operator routes, not the admin API.
    coordinator: bool,
    work: Work,
}

/// What a call does.
#[derive(Debug)]
enum Work {
    /// One request to a catalog route.
    Route {
        method: http::Method,
        path: String,
        body: Option<Value>,
    },
    /// `ensure`: the one object, as its spec says.
    Ensure(Desired),
    /// `state plan|verify|apply`: the document's objects, in order; with `prune`, then the
    /// objects of the document's kinds it does not name.
    State {
        verb: StateVerb,
        objects: Vec<Desired>,
        prune: bool,
    },
    /// `catalog describe`: answered here, without a request.
    Describe(Value),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StateVerb {
    /// What apply would do, changing nothing.
    Plan,
    /// Whether every object already is as desired.
    Verify,
    /// Each object created or changed, in order; stops at the first refusal.
    Apply,
}

/// One object of `ensure` or of a `state` document: where its kind lives, the field that
/// names it, its spec.
#[derive(Debug)]
struct Desired {
    kind: &'static str,
    collection: String,
    key: &'static str,
    spec: Map<String, Value>,
}

fn prepare(
    headers: &HeaderMap,
    claims: &MandateClaims,
    invocation: &Invocation,
) -> Result<Call, Refusal> {
    if let Some(zone) = headers.get("x-caracal-zone-scope")
        && zone.to_str().ok() != Some(claims.zone_id.as_str())
    {
        return Err(refuse(
            StatusCode::CONFLICT,
            "zone_mismatch",
            "a control key acts only in its own zone",
        ));
    }
    check_authorized_by(invocation)?;
    if invocation.command == "state" {
        return prepare_state(claims, invocation);
    }
    if (invocation.command.as_str(), invocation.subcommand.as_str()) == ("catalog", "describe") {
        if !invocation.flags.is_empty() {
            return Err(invalid("`catalog describe` takes no flags"));
        }
        return Ok(Call {
            writes: false,
            coordinator: false,
            work: Work::Describe(describe(claims)),
        });
    }
    let found = if invocation.command == "ensure" {
        ENSURED
            .iter()
            .find(|(kind, ..)| *kind == invocation.subcommand)
            .map(|(kind, entry, key)| (entry, Some((*kind, *key))))
    } else {
        CATALOG
            .iter()
            .find(|e| e.command == invocation.command && e.subcommand == invocation.subcommand)
            .map(|entry| (entry, None))
    };
    let Some((entry, ensure_key)) = found else {
        return Err(refuse(
            StatusCode::NOT_IMPLEMENTED,
            "unsupported",
            format!(
                "`{} {}` is not a control command",
                truncated(&invocation.command),
                truncated(&invocation.subcommand)
            ),
        ));
    };
    let class = class(entry.subcommand);
    require_scope(claims, entry.command, class)?;
    if let Some((kind, _)) = ensure_key {
        policies::require_read_scopes(claims, kind)?;
    }
    if invocation.flags.len() > MAX_FLAGS {
        return Err(invalid(format!("at most {MAX_FLAGS} flags")));
    }
    let mut flags = invocation.flags.clone();
    for (name, value) in &flags {
        if let Value::Array(items) = value
            && items.len() > MAX_FLAG_ITEMS
        {
            return Err(invalid(format!(
                "flag `{}` has more than {MAX_FLAG_ITEMS} items",
                truncated(name)
            )));
        }
    }
    let id = match flags.remove("id") {
        None => None,
        // A plain id with no dots in a row, and never a dot segment (`.` and `..` are plain
        // ids): what it names is one object, never a relative path.
        Some(Value::String(id))
            if caracal_core::is_plain_id(&id) && !id.starts_with('.') && !id.contains("..") =>
        {
            Some(id)
        }
        Some(_) => return Err(invalid("flag `id` must be an object id")),
    };
    let path = if entry.path.contains("{id}") {
        let Some(id) = &id else {
            return Err(invalid(format!(
                "`{} {}` needs the flag `id`",
                entry.command, entry.subcommand
            )));
        };
        entry.path.replace("{id}", id)
    } else if id.is_some() {
        return Err(invalid(format!(
            "`{} {}` takes no `id`",
            entry.command, entry.subcommand
        )));
    } else {
        entry.path.to_owned()
    };
    let mut path = if path.starts_with('/') {
        path
    } else if entry.coordinator {
        format!("/zones/{}/{path}", claims.zone_id)
    } else {
        format!("/v1/zones/{}/{path}", claims.zone_id)
    };
    let method = http::Method::from_bytes(entry.method.as_bytes()).map_err(|_| {
        refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "a catalog entry has no method",
        )
    })?;
    let body = if method == http::Method::GET {
        let mut query = Vec::with_capacity(flags.len());
        for (name, value) in &flags {
            let text = match value {
                Value::String(text) => text.clone(),
                Value::Number(number) => number.to_string(),
                Value::Bool(flag) => flag.to_string(),
                _ => {
                    return Err(invalid(format!(
                        "flag `{}` of a read must be a string, number or boolean",
                        truncated(name)
                    )));
                }
            };
            query.push((name.as_str(), text));
        }
        let query = serde_urlencoded::to_string(&query)
            .map_err(|_| invalid("flags do not form a query"))?;
        if !query.is_empty() {
            path = format!("{path}?{query}");
        }
        None
    } else {
        if let Some((_, key)) = ensure_key
            && flags
                .get(key)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        {
            return Err(invalid(format!(
                "`ensure {}` needs the flag `{key}`",
                invocation.subcommand
            )));
        }
        (!flags.is_empty()).then_some(Value::Object(flags))
    };
    let work = match (ensure_key, body) {
        (None, body) => Work::Route { method, path, body },
        (Some((kind, key)), Some(Value::Object(spec))) => {
            policies::check_spec(kind, &spec).map_err(invalid)?;
            Work::Ensure(Desired {
                kind,
                collection: path,
                key,
                spec,
            })
        }
        // Never a plain request in its place: an ensure without a spec is refused.
        (Some((kind, key)), _) => {
            return Err(invalid(format!("`ensure {kind}` needs the flag `{key}`")));
        }
    };
    Ok(Call {
        writes: class != "read",
        coordinator: entry.coordinator,
        work,
    })
}

/// The mandate holds `control:<command>:<class>`, or a 403 `denied` naming it.
fn require_scope(claims: &MandateClaims, command: &str, class: &str) -> Result<(), Refusal> {
    let needed = format!("control:{command}:{class}");
    if scopes(claims).any(|scope| scope == needed) {
        return Ok(());
    }
    Err(refuse(
        StatusCode::FORBIDDEN,
        "denied",
        format!("the mandate lacks `{needed}`"),
    ))
}

fn check_authorized_by(invocation: &Invocation) -> Result<(), Refusal> {
    match &invocation.authorized_by {
        Some(by)
            if by.trim().is_empty()
                || by.chars().count() > MAX_AUTHORIZED_BY
                || by.chars().any(char::is_control) =>
        {
            Err(invalid(format!(
                "authorized_by must be 1 to {MAX_AUTHORIZED_BY} printable characters"
            )))
        }
        _ => Ok(()),
    }
}

/// `state plan|verify|apply` with the flag `objects`: up to 64 `{kind, spec}` of the kinds
/// `ensure` keeps, each named once by its key field; `dry_run: true` makes apply a plan;
/// `prune: true` also archives the objects of the document's kinds that it does not name (never
/// an application holding privileged traits: a control key's are an operator's to retire; nor
/// the zone's active policy set). Needs the read scope (plan, verify, dry run) or the write
/// scope (apply) of every kind it touches (a policy set's also reads policies), and to prune in
/// apply their delete scope too; a policy set comes after the document's policies it names.
fn prepare_state(claims: &MandateClaims, invocation: &Invocation) -> Result<Call, Refusal> {
    let mut verb = match invocation.subcommand.as_str() {
        "plan" => StateVerb::Plan,
        "verify" => StateVerb::Verify,
        "apply" => StateVerb::Apply,
        other => {
            return Err(refuse(
                StatusCode::NOT_IMPLEMENTED,
                "unsupported",
                format!("`state {}` is not a control command", truncated(other)),
            ));
        }
    };
    let mut prune = false;
    for (name, value) in &invocation.flags {
        match (name.as_str(), value) {
            ("objects", Value::Array(_)) | ("dry_run", Value::Bool(false)) => {}
            ("dry_run", Value::Bool(true)) if verb == StateVerb::Apply => verb = StateVerb::Plan,
            ("prune", Value::Bool(wanted)) => prune = *wanted,
            _ => {
                return Err(invalid(format!(
                    "`state` takes `objects` (an array), `prune` (a boolean) and `dry_run` (a boolean for apply), not `{}`",
                    truncated(name)
                )));
            }
        }
    }
    let Some(Value::Array(items)) = invocation.flags.get("objects") else {
        return Err(invalid("`state` needs the flag `objects`"));
    };
    if items.is_empty() || items.len() > MAX_FLAG_ITEMS {
        return Err(invalid(format!(
            "`objects` holds 1 to {MAX_FLAG_ITEMS} objects"
        )));
    }
    let class = if verb == StateVerb::Apply {
        "write"
    } else {
        "read"
    };
    let mut objects: Vec<Desired> = Vec::with_capacity(items.len());
    for (n, item) in items.iter().enumerate() {
        let (Some(Value::String(kind)), Some(Value::Object(spec)), 2) = (
            item.get("kind"),
            item.get("spec"),
            item.as_object().map_or(0, Map::len),
        ) else {
            return Err(invalid(format!("object {n} is not `{{kind, spec}}`")));
        };
        let Some((kind, entry, key)) = ENSURED.iter().find(|(known, ..)| known == kind) else {
            return Err(refuse(
                StatusCode::NOT_IMPLEMENTED,
                "unsupported",
                format!(
                    "object {n}: `state` keeps applications, identity providers, resources, policies and policy sets, not `{}`",
                    truncated(kind)
                ),
            ));
        };
        let Some(name) = spec
            .get(*key)
            .and_then(Value::as_str)
            .filter(|name| !name.is_empty())
        else {
            return Err(invalid(format!(
                "object {n} ({kind}) needs `{key}` in its spec"
            )));
        };
        if objects
            .iter()
            .any(|other| other.kind == *kind && other.spec.get(*key) == spec.get(*key))
        {
            return Err(invalid(format!(
                "object {n}: {kind} `{}` is named twice",
                truncated(name)
            )));
        }
        policies::check_spec(kind, spec)
            .map_err(|error| invalid(format!("object {n}: {error}")))?;
        require_scope(claims, entry.command, class)?;
        policies::require_read_scopes(claims, kind)?;
        if prune && verb == StateVerb::Apply {
            require_scope(claims, entry.command, "delete")?;
        }
        objects.push(Desired {
            kind,
            collection: format!("/v1/zones/{}/{}", claims.zone_id, entry.path),
            key,
            spec: spec.clone(),
        });
    }
    policies::check_order(&objects).map_err(invalid)?;
    Ok(Call {
        writes: verb == StateVerb::Apply,
        coordinator: false,
        work: Work::State {
            verb,
            objects,
            prune,
        },
    })
}

/// `catalog describe`: the commands this mandate's scopes allow, each with the scope it needs
/// and whether it needs an `id`; `ensure` and `state` where a kind they keep is allowed.
fn describe(claims: &MandateClaims) -> Value {
    let held = |command: &str, class: &str| require_scope(claims, command, class).is_ok();
    let mut commands: Vec<Value> = CATALOG
        .iter()
        .filter(|entry| held(entry.command, class(entry.subcommand)))
        .map(|entry| {
            json!({
                "command": entry.command,
                "subcommand": entry.subcommand,
                "scope": format!("control:{}:{}", entry.command, class(entry.subcommand)),
                "needs_id": entry.path.contains("{id}"),
            })
        })
        .collect();
    for (kind, entry, key) in ENSURED {
        let noun = entry.command;
        if held(noun, "write") {
            commands.push(json!({"command": "ensure", "subcommand": kind, "scope": format!("control:{noun}:write"), "needs": key}));
        }
        for (verb, class) in [("plan", "read"), ("verify", "read"), ("apply", "write")] {
            if held(noun, class) {
                commands.push(json!({"command": "state", "subcommand": verb, "kind": kind, "scope": format!("control:{noun}:{class}")}));
            }
        }
    }
    json!({"commands": commands})
}

/// At most 64 characters of caller text in a message.
fn truncated(text: &str) -> String {
    text.chars().take(64).collect()
}

/// The admin API as one control invocation reaches it for `ensure` and `state`.
struct AdminApi<'a> {
    router: &'a Router,
    caller: AdminCaller,
    request_id: Option<&'a RequestId>,
}

/// An admin route's answer that was not a success: its status and body, passed on as they are.
type Refused = (StatusCode, Value);

impl AdminApi<'_> {
    async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        send(
            self.router,
            self.caller.clone(),
            method,
            path,
            body,
            self.request_id,
        )
        .await
    }

    /// The answer of a successful request, or the refusal.
    async fn expect(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Refused> {
        let (status, answer) = self.send(method, path, body).await;
        if status.is_success() {
            Ok(answer)
        } else {
            Err((status, answer))
        }
    }
}

/// Collections read once per invocation, by path: the document names each object once, so
/// what apply creates is added here rather than looked for again.
type Listed = std::collections::HashMap<String, Vec<Value>>;

/// The objects of `collection`, listed on first use.
async fn listed<'l>(
    api: &AdminApi<'_>,
    listed: &'l mut Listed,
    collection: &str,
) -> Result<&'l [Value], Refused> {
    if !listed.contains_key(collection) {
        let objects = list_all(api, collection, ENSURE_PAGING).await?;
        listed.insert(collection.to_owned(), objects);
    }
    Ok(listed
        .get(collection)
        .map(Vec::as_slice)
        .unwrap_or_default())
}

/// An object of `ensure` or `state` as found.
#[derive(Debug, Default)]
struct Found {
    /// As the admin API shows it; none when it does not exist.
    object: Option<Value>,
    /// The spec's fields it does not hold as given.
    fields: Vec<String>,
    /// A policy set's: the policy versions its manifest should name (none while, in a plan,
    /// a policy of the document is still to be created or changed), and the version it holds.
    manifest: Option<Vec<String>>,
    version_id: Option<String>,
}

impl Found {
    fn planned(&self) -> &'static str {
        match (&self.object, self.fields.is_empty()) {
            (None, _) => "create",
            (Some(_), true) => "unchanged",
            (Some(_), false) => "update",
        }
    }
}

/// Looks `desired` up in its collection and compares. `pending` names the policies a plan
/// would create or change before this object.
async fn observe(
    api: &AdminApi<'_>,
    desired: &Desired,
    known: &mut Listed,
    pending: &std::collections::HashSet<String>,
) -> Result<Found, Refused> {
    let objects = listed(api, known, &desired.collection).await?;
    let object = named(objects, desired.key, &desired.spec).cloned();
    match desired.kind {
        "policy" => policies::observe_policy(api, desired, object).await,
        "policy-set" => policies::observe_set(api, desired, object, known, pending).await,
        _ => Ok(Found {
            fields: object.as_ref().map_or_else(Vec::new, |object| {
                differences(&desired.spec, object).keys().cloned().collect()
            }),
            object,
            ..Found::default()
        }),
    }
}

/// Creates or changes `desired` as `found` requires: `{action, object}`, or the refusal.
async fn apply(
    api: &AdminApi<'_>,
    desired: &Desired,
    found: Found,
    known: &mut Listed,
) -> (StatusCode, Value) {
    let (status, answer) = match desired.kind {
        "policy" => policies::apply_policy(api, desired, found).await,
        "policy-set" => policies::apply_set(api, desired, found).await,
        _ => reconcile(api, &desired.collection, &desired.spec, found.object).await,
    };
    if status.is_success()
        && answer.get("action") == Some(&json!("created"))
        && let Some(objects) = known.get_mut(&desired.collection)
    {
        objects.push(answer.get("object").cloned().unwrap_or_default());
    }
    (status, answer)
}

/// `ensure`: the object of its collection whose key field is the spec's, created, changed
/// where it differs, or left. Answers `{action: created|updated|unchanged, object}`, or the
/// admin route's refusal.
async fn ensure(api: &AdminApi<'_>, desired: &Desired) -> (StatusCode, Value) {
    let mut known = Listed::new();
    let found = match observe(api, desired, &mut known, &Default::default()).await {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    if found.planned() == "unchanged" {
        let object = found.object.unwrap_or_default();
        return (
            StatusCode::OK,
            json!({"action": "unchanged", "object": object}),
        );
    }
    apply(api, desired, found, &mut known).await
}

/// Every object of `collection`, `paging.0` a page; more than `paging.1` pages is a conflict
/// rather than a guess.
async fn list_all(
    api: &AdminApi<'_>,
    collection: &str,
    (page_size, max_pages): (usize, usize),
) -> Result<Vec<Value>, Refused> {
    let mut objects = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..max_pages {
        let mut query = vec![("limit", page_size.to_string())];
        query.extend(cursor.take().map(|cursor| ("cursor", cursor)));
        let path = format!(
            "{collection}?{}",
            serde_urlencoded::to_string(&query).unwrap_or_default()
        );
        let mut page = api.expect(http::Method::GET, &path, None).await?;
        if let Some(Value::Array(items)) = page.get_mut("items") {
            objects.append(items);
        }
        cursor = page
            .get("next_cursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if cursor.is_none() {
            return Ok(objects);
        }
    }
    let error = format!(
        "more than {} objects to search; use create and patch",
        page_size * max_pages
    );
    Err(conflict(&error))
}

/// A 409 `conflict` as the admin API words it.
fn conflict(description: &str) -> Refused {
    (
        StatusCode::CONFLICT,
        json!({"error": "conflict", "error_description": description}),
    )
}

/// The object among `objects` whose `key` field is `spec`'s.
fn named<'o>(objects: &'o [Value], key: &str, spec: &Map<String, Value>) -> Option<&'o Value> {
    objects
        .iter()
        .find(|object| object.get(key) == spec.get(key))
}

/// The fields of `spec` that `object` does not already hold as given.
fn differences(spec: &Map<String, Value>, object: &Value) -> Map<String, Value> {
    spec.iter()
        .filter(|(name, value)| object.get(name.as_str()) != Some(value))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Creates `spec` in `collection` when nothing was `found`, else changes the fields that differ
/// (or nothing): `{action, object}`, or the admin route's refusal.
async fn reconcile(
    api: &AdminApi<'_>,
    collection: &str,
    spec: &Map<String, Value>,
    found: Option<Value>,
) -> (StatusCode, Value) {
    let (action, method, path, body) = match found {
        None => (
            "created",
            http::Method::POST,
            collection.to_owned(),
            spec.clone(),
        ),
        Some(object) => {
            let changes = differences(spec, &object);
            if changes.is_empty() {
                return (
                    StatusCode::OK,
                    json!({"action": "unchanged", "object": object}),
                );
            }
            let Some(id) = plain_id(&object) else {
                return (StatusCode::BAD_GATEWAY, Value::Null);
            };
            (
                "updated",
                http::Method::PATCH,
                format!("{collection}/{id}"),
                changes,
            )
        }
    };
    let body = Value::Object(body);
    match api.expect(method, &path, Some(&body)).await {
        Ok(answer) => (StatusCode::OK, json!({"action": action, "object": answer})),
        Err(refused) => refused,
    }
}

/// An object's `id`, when it is one a path may hold.
fn plain_id(object: &Value) -> Option<&str> {
    object
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| caracal_core::is_plain_id(id))
}

/// `state`: each object found, then compared (plan, verify) or reconciled (apply), in order;
/// with `prune`, then every object of the document's kinds that it does not name, planned
/// `delete` or archived (`deleted`), resources before applications before identity providers
/// (a provider a live resource uses cannot go first), policy sets before policies. Answers
/// `{objects: [{kind, name, action, id, fields}]}` — `create|update|unchanged|delete` planned,
/// `created|updated|unchanged|deleted` applied — and `in_sync` for verify; a refusal during
/// apply names the object and how many before it were done.
async fn state_run(
    api: &AdminApi<'_>,
    verb: StateVerb,
    objects: &[Desired],
    prune: bool,
) -> (StatusCode, Value) {
    let mut report = Vec::with_capacity(objects.len());
    let mut known = Listed::new();
    // Policies a plan would create or change: a set naming one would get a new version.
    let mut pending = std::collections::HashSet::new();
    for (n, desired) in objects.iter().enumerate() {
        let name = desired.spec.get(desired.key).cloned().unwrap_or_default();
        let refused = |refusal| {
            let what = format!("object {n} ({} {name})", desired.kind);
            state_refusal(refusal, &what, (verb == StateVerb::Apply).then_some(n))
        };
        let found = match observe(api, desired, &mut known, &pending).await {
            Ok(found) => found,
            Err(refusal) => return refused(refusal),
        };
        let id = found
            .object
            .as_ref()
            .and_then(|object| object.get("id"))
            .cloned();
        let fields = found.fields.clone();
        let planned = found.planned();
        if verb != StateVerb::Apply || planned == "unchanged" {
            if desired.kind == "policy" && planned != "unchanged" {
                pending.insert(name.as_str().unwrap_or_default().to_owned());
            }
            report.push(json!({"kind": desired.kind, "name": name, "action": planned, "id": id, "fields": fields}));
            continue;
        }
        let (status, answer) = apply(api, desired, found, &mut known).await;
        if !status.is_success() {
            return refused((status, answer));
        }
        let id = answer.pointer("/object/id").cloned();
        report.push(json!({"kind": desired.kind, "name": name, "action": answer.get("action"), "id": id, "fields": fields}));
    }
    if prune {
        for (kind, collection, key, unnamed) in unnamed_objects(objects, &known) {
            let name = unnamed.get(key).cloned().unwrap_or_default();
            let id = unnamed.get("id").cloned().unwrap_or_default();
            let action = if verb == StateVerb::Apply {
                let Some(id) = plain_id(unnamed) else {
                    return (StatusCode::BAD_GATEWAY, Value::Null);
                };
                let path = format!("{collection}/{id}");
                if let Err(refusal) = api.expect(http::Method::DELETE, &path, None).await {
                    let what = format!("pruning {kind} {name}");
                    return state_refusal(refusal, &what, Some(report.len()));
                }
                "deleted"
            } else {
                "delete"
            };
            report.push(
                json!({"kind": kind, "name": name, "action": action, "id": id, "fields": []}),
            );
        }
    }
    let in_sync = report
        .iter()
        .all(|object| object.get("action").and_then(Value::as_str) == Some("unchanged"));
    let answer = match verb {
        StateVerb::Verify => json!({"objects": report, "in_sync": in_sync}),
        StateVerb::Plan | StateVerb::Apply => json!({"objects": report}),
    };
    (StatusCode::OK, answer)
}

/// What `prune` takes away: the listed objects of each kind of the document that it does not
/// name, in the order they can go (resources, applications, identity providers; policy sets,
/// policies), as `(kind, collection, key field, object)`. Applications holding privileged
/// traits stay, and so does the zone's active policy set (archiving it would deny every
/// request of the zone).
fn unnamed_objects<'l>(
    objects: &'l [Desired],
    listed: &'l Listed,
) -> Vec<(&'static str, &'l str, &'static str, &'l Value)> {
    const ORDER: [&str; 5] = [
        "resource",
        "application",
        "identity-provider",
        "policy-set",
        "policy",
    ];
    let spared = |kind: &str, object: &Value| match kind {
        "application" => object
            .get("traits")
            .and_then(Value::as_array)
            .is_some_and(|traits| {
                traits
                    .iter()
                    .filter_map(Value::as_str)
                    .any(crate::admin::privileged_trait)
            }),
        "policy-set" => object
            .get("active_version_id")
            .is_some_and(|active| !active.is_null()),
        _ => false,
    };
    let mut unnamed = Vec::new();
    for kind in ORDER {
        let Some(desired) = objects.iter().find(|desired| desired.kind == kind) else {
            continue;
        };
        let collection = desired.collection.as_str();
        for object in listed.get(collection).into_iter().flatten() {
            let kept = objects.iter().any(|desired| {
                desired.collection == collection
                    && object.get(desired.key) == desired.spec.get(desired.key)
            });
            if !(kept || spared(kind, object)) {
                unnamed.push((desired.kind, collection, desired.key, object));
            }
        }
    }
    unnamed
}

/// An admin route's refusal of a `state` step, its description naming `what` was refused and,
/// for apply, how many steps before it were `done`.
fn state_refusal(
    (status, mut answer): (StatusCode, Value),
    what: &str,
    done: Option<usize>,
) -> (StatusCode, Value) {
    let cause = answer
        .get("error_description")
        .and_then(Value::as_str)
        .unwrap_or("refused")
        .to_owned();
    // Only apply changes anything: a refused plan or verify has nothing done to report.
    let done = done.map_or(String::new(), |done| {
        format!("; the {done} before it were done")
    });
    if let Some(fields) = answer.as_object_mut() {
        fields.insert(
            "error_description".to_owned(),
            json!(format!("{what}: {cause}{done}")),
        );
    }
    (status, answer)
}

/// One request to an admin route as `caller`.
async fn send(
    admin: &Router,
    caller: AdminCaller,
    method: http::Method,
    path: &str,
    body: Option<&Value>,
    request_id: Option<&RequestId>,
) -> (StatusCode, Value) {
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(id) = request_id {
        request = request.extension(id.clone());
    }
    let body = body.map(Value::to_string).unwrap_or_default();
    let Ok(request) = request.body(Body::from(body)) else {
        return (StatusCode::BAD_REQUEST, Value::Null);
    };
    // Boxed: the admin route's future would otherwise sit inside this one's, twice the stack.
    let response = match Box::pin(crate::auth::acting_as(
        caller,
        admin.clone().oneshot(request),
    ))
    .await
    {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), crate::admin::MAX_BODY * 64)
        .await
        .unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The admin route's refusal in the control envelope; its own code leads the reason.
fn admin_refusal(status: StatusCode, answer: &Value) -> Refusal {
    let code = match status.as_u16() {
        400 | 413 | 415 | 422 => "invalid",
        403 => "denied",
        404 => "not_found",
        405 => "unsupported",
        409 => "conflict",
        423 => "change_freeze",
        429 => "rate_limited",
        _ => "upstream",
    };
    let status = match code {
        "unsupported" => StatusCode::NOT_IMPLEMENTED,
        "upstream" => StatusCode::BAD_GATEWAY,
        _ => status,
    };
    let reason = match (
        answer.get("error").and_then(Value::as_str),
        answer.get("error_description").and_then(Value::as_str),
    ) {
        (Some(code), Some(description)) => format!("{code}: {description}"),
        (Some(code), None) => code.to_owned(),
        _ => format!("the admin API answered {status}"),
    };
    refuse(status, code, reason)
}

/// The `control.invoke` audit event: allowed (no refusal) or denied, by which key, for what.
fn decision_event(
    claims: &MandateClaims,
    request_id: Option<&RequestId>,
    invocation: Option<&Invocation>,
    refusal: Option<&Refusal>,
) -> Event {
    Event {
        id: uuid::Uuid::now_v7().to_string(),
        zone_id: claims.zone_id.clone(),
        event_type: "control.invoke".to_owned(),
        request_id: request_id.map_or_else(|| "none".to_owned(), ToString::to_string),
        decision: if refusal.is_some() { "deny" } else { "allow" }.to_owned(),
        policy_set_id: None,
        policy_set_version_id: None,
        manifest_sha: None,
        evaluation_status: "complete".to_owned(),
        determining_policies_json: json!([{"policy": "control-key"}]),
        diagnostics_json: json!(refusal.map_or_else(Vec::new, |refusal| vec![
            json!({"code": refusal.code, "reason": refusal.reason})
        ])),
        metadata_json: json!({
            "actor": format!("control:{}", claims.client_id),
            "authority_record": claims.sid,
            "command": invocation.map(|i| truncated(&i.command)),
            "subcommand": invocation.map(|i| truncated(&i.subcommand)),
            "flags": invocation.map(|i| i.flags.keys().take(MAX_FLAGS).map(|name| truncated(name)).collect::<Vec<_>>()),
            "authorized_by": invocation.and_then(|i| i.authorized_by.as_deref().map(truncated)),
            "co_author_operator": invocation.and_then(|i| i.co_author_operator),
        }),
        occurred_at_ms: now_ms(),
    }
}

mod policies;
#[cfg(test)]
mod tests;
