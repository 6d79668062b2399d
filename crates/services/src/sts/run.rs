//! `caracal run`'s two STS routes. A workload (a launcher identity the admin API keeps, with
//! env bindings) authenticates with its id and `ws_` secret on each call:
//! `POST /v1/run/manifest` answers its bindings; `POST /v1/run/credential` releases one
//! binding's provider credential once the binding still holds (the resource live, its scopes
//! declared, the provider allowing runtime injection) and the zone's policy allows it
//! (`caracal-workload-mint`), with its audit event recorded durably first. Transport rules are
//! the token endpoint's; every failure refuses.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use caracal_audit::Event;
use caracal_core::RequestId;
use caracal_policy::{Decision, Flow, Verdict};
use caracal_store::{AdminObject, now_ms};
use http::{HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::exchange::{count_failure, denial, not_locked_out, read_form_body, within_mint_limit};
use super::{Sts, TokenError, form};
use crate::state::RoleState;

/// A workload's binding, as the admin API takes and stores it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub env: String,
    pub resource: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub optional: bool,
    #[serde(default = "on_failure_default")]
    pub on_failure: String,
}

fn on_failure_default() -> String {
    "error".to_owned()
}

/// Variables a launcher must never set for a child: they change what runs or where it looks.
const BLOCKED_ENV: [&str; 13] = [
    "PATH",
    "HOME",
    "SHELL",
    "USER",
    "PWD",
    "IFS",
    "ENV",
    "BASH_ENV",
    "PYTHONPATH",
    "NODE_OPTIONS",
    "BUN_OPTIONS",
    "PYTHONSTARTUP",
    "PERL5OPT",
];

/// A binding's variable is an upper-case name a launcher may set: never one that changes what
/// runs (`PATH`, `LD_*`, …) nor one of Caracal's own. The admin API checks it when a binding
/// is written, and the launcher again before it sets it.
pub fn check_env_name(env: &str) -> Result<(), String> {
    let well_formed = env.len() <= 128
        && env
            .bytes()
            .next()
            .is_some_and(|first| first.is_ascii_uppercase() || first == b'_')
        && env
            .bytes()
            .all(|byte| byte.is_ascii_uppercase() || byte.is_ascii_digit() || byte == b'_');
    if !well_formed {
        return Err("must be an upper-case variable name".to_owned());
    }
    if BLOCKED_ENV.contains(&env)
        || env.starts_with("LD_")
        || env.starts_with("DYLD_")
        || env.starts_with("CARACAL_")
    {
        return Err(format!("`{env}` may not be set by a launcher"));
    }
    Ok(())
}

/// The provider kinds whose credential a launcher can be handed: a stored value, or a token
/// the STS fetches with the provider's client credentials.
const RELEASED_KINDS: [&str; 3] = ["api_key", "bearer_token", "oauth2_client_credentials"];

pub async fn manifest(
    State(state): State<RoleState>,
    request_id: Option<Extension<RequestId>>,
    request: Request,
) -> Response {
    let request_id = request_id.map(|id| id.to_string()).unwrap_or_default();
    match answer_manifest(&state, request).await {
        Ok(body) => no_store(body),
        Err(error) => error.render(&request_id),
    }
}

pub async fn credential(
    State(state): State<RoleState>,
    request_id: Option<Extension<RequestId>>,
    request: Request,
) -> Response {
    let request_id = request_id.map(|id| id.to_string()).unwrap_or_default();
    match release(&state, &request_id, request).await {
        Ok(body) => no_store(body),
        Err(error) => error.render(&request_id),
    }
}

fn no_store(body: Value) -> Response {
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

/// A workload that authenticated, with its zone and bindings.
struct Workload {
    id: String,
    zone_id: String,
    bindings: Vec<Binding>,
}

/// The checks both routes make before the workload's fields mean anything: the STS serving,
/// the form, the launch id, the workload's secret, and its zone not contained.
async fn admit(
    state: &RoleState,
    request: Request,
) -> Result<(Arc<Sts>, Workload, form::TokenForm), TokenError> {
    let Some(sts) = state.sts.clone() else {
        return Err(TokenError::internal());
    };
    if state.shared.is_draining() {
        return Err(TokenError::unavailable("the STS is shutting down"));
    }
    let received = read_form_body(request).await?;
    if let Some(launch) = received.parts.headers.get("x-caracal-launch-id")
        && launch
            .to_str()
            .ok()
            .and_then(|text| uuid::Uuid::parse_str(text).ok())
            .is_none()
    {
        return Err(TokenError::malformed("X-Caracal-Launch-Id must be a UUID"));
    }
    let workload = authenticate(state, &sts, &received.form).await?;
    if state.shared.containment.fail_closed(&workload.zone_id) {
        let mut contained =
            TokenError::unavailable("an incident containment refuses protected traffic");
        contained.code = "contained";
        return Err(contained);
    }
    Ok((sts, workload, received.form))
}

/// The workload named by the form, if its secret is right. Failures all look the same; a
/// workload that keeps failing is locked out for a minute, as an application is.
async fn authenticate(
    state: &RoleState,
    sts: &Sts,
    form: &form::TokenForm,
) -> Result<Workload, TokenError> {
    let refused = || TokenError::unauthenticated("invalid workload credentials");
    let (Some(id), Some(secret)) = (&form.workload_id, &form.secret) else {
        return Err(refused());
    };
    if !caracal_core::is_plain_id(id) {
        return Err(refused());
    }
    let now = now_ms();
    let lockout_key = format!("workload:{id}");
    not_locked_out(sts, &lockout_key, now)?;
    let object = state
        .shared
        .store
        .find_admin_object("workload", id)
        .await?
        .filter(|object| object.status == "active");
    let body = object.as_ref().map(AdminObject::fields).unwrap_or_default();
    let verified = match body.get("_secret_hash").and_then(Value::as_str) {
        Some(hash) => sts.secrets.verify(&lockout_key, secret, hash).await,
        None => false,
    };
    match object {
        Some(object) if verified => Ok(Workload {
            id: object.id,
            zone_id: object.zone_id,
            bindings: body
                .get("bindings")
                .and_then(|bindings| serde_json::from_value(bindings.clone()).ok())
                .unwrap_or_default(),
        }),
        _ => {
            count_failure(state, sts, &lockout_key, now);
            Err(refused())
        }
    }
}

async fn answer_manifest(state: &RoleState, request: Request) -> Result<Value, TokenError> {
    let (_, workload, _) = admit(state, request).await?;
    Ok(json!({
        "zone_id": workload.zone_id,
        "workload_id": workload.id,
        "bindings": workload.bindings,
    }))
}

async fn release(
    state: &RoleState,
    request_id: &str,
    request: Request,
) -> Result<Value, TokenError> {
    let launch_id = request
        .headers()
        .get("x-caracal-launch-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let (sts, workload, form) = admit(state, request).await?;
    let env = form.env.as_deref().unwrap_or_default();
    let binding = workload
        .bindings
        .iter()
        .find(|binding| binding.env == env)
        .ok_or_else(|| {
            TokenError::malformed(format!(
                "the workload binds no `{}`",
                env.chars().take(128).collect::<String>()
            ))
        })?;
    let store = state.shared.store.as_ref();
    let loaded = sts.policies.get(&workload.zone_id);
    let event = |decision: &Decision, provider: Option<&str>| Event {
        id: uuid::Uuid::now_v7().to_string(),
        zone_id: workload.zone_id.clone(),
        event_type: "credential_injection".to_owned(),
        request_id: request_id.to_owned(),
        decision: match decision.decision {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
        .to_owned(),
        policy_set_id: None,
        policy_set_version_id: loaded.as_ref().map(|loaded| loaded.version_id.clone()),
        manifest_sha: loaded.as_ref().map(|loaded| loaded.manifest_sha256.clone()),
        evaluation_status: decision.evaluation_status.clone(),
        determining_policies_json: serde_json::to_value(&decision.determining_policies)
            .unwrap_or_default(),
        diagnostics_json: serde_json::to_value(&decision.diagnostics).unwrap_or_default(),
        metadata_json: json!({
            "workload_id": workload.id,
            "env": binding.env,
            "resource": binding.resource,
            "scopes": binding.scopes,
            "provider_id": provider,
            "launch_id": launch_id,
        }),
        occurred_at_ms: now_ms(),
    };
    // The binding's own checks, each a named denial recorded like the policy's.
    let refuse = |code: &str, description: String| (denial(code, &description), description);
    let resource = store
        .find_resource(&workload.zone_id, &binding.resource)
        .await?
        .filter(|resource| resource.archived_at_ms.is_none());
    let provider = match &resource {
        Some(resource) => store
            .get_provider(&workload.zone_id, &resource.provider_id)
            .await?
            .filter(|provider| provider.archived_at_ms.is_none()),
        None => None,
    };
    let verdict = match (&resource, &provider) {
        (None, _) => Err(refuse(
            "resource_not_found",
            format!("resource `{}` is not live in the zone", binding.resource),
        )),
        (Some(resource), _)
            if !binding
                .scopes
                .iter()
                .all(|scope| resource.scopes.contains(scope)) =>
        {
            Err(refuse(
                "scope_not_declared",
                format!("scope not declared by resource `{}`", resource.identifier),
            ))
        }
        (Some(_), None) => Err(refuse(
            "provider_not_found",
            "the resource's credential provider is gone".to_owned(),
        )),
        (Some(_), Some(provider)) if !runtime_injection_allowed(&provider.config) => Err(refuse(
            "runtime_injection_not_allowed",
            "the provider does not allow runtime injection (allow_runtime_injection)".to_owned(),
        )),
        (Some(_), Some(provider)) if !RELEASED_KINDS.contains(&provider.kind.as_str()) => {
            Err(refuse(
                "provider_kind_not_released",
                format!(
                    "`{}` credentials are not released to a launcher",
                    provider.kind
                ),
            ))
        }
        (Some(resource), Some(_)) => {
            let request = caracal_policy::Request {
                flow: Flow::Workload,
                application_id: workload.id.clone(),
                resource: resource.identifier.clone(),
                scopes: binding.scopes.clone(),
                labels: Vec::new(),
                edge_scopes: None,
                session: false,
                subject: false,
                target: Vec::new(),
            };
            let decision =
                caracal_policy::decide(loaded.as_deref().map(|loaded| &loaded.bundle), &request);
            match decision.reason() {
                Some(reason) => {
                    let description = format!("policy denied ({reason})");
                    Err((decision, description))
                }
                None => Ok(decision),
            }
        }
    };
    let provider_id = provider.as_ref().map(|provider| provider.id.as_str());
    let decision = match verdict {
        Ok(decision) => decision,
        Err((decision, description)) => {
            state
                .shared
                .evidence
                .record(event(&decision, provider_id))
                .await?;
            return Err(TokenError::denied(description));
        }
    };
    let (Some(resource), Some(provider)) = (resource, provider) else {
        return Err(TokenError::internal());
    };
    within_mint_limit(
        state,
        &sts,
        &workload.zone_id,
        &resource.identifier,
        &workload.id,
    )
    .await?;
    // The provider's credential as the Gateway would inject it; for client credentials, the
    // token fetched with them.
    let directive = super::gateway::upstream_of(state, &sts, &resource, &provider, None).await?;
    let (credential, expires_at) = if provider.kind == "oauth2_client_credentials" {
        let (token, until) = brokered_token(&sts, &directive, &resource.identifier).await?;
        let left = until.saturating_duration_since(std::time::Instant::now());
        let left = i64::try_from(left.as_secs()).unwrap_or(0);
        (token, Some(now_ms() / 1000 + left))
    } else {
        let stored = directive.provider_token.filter(|value| !value.is_empty());
        (stored.ok_or_else(unavailable_credential)?, None)
    };
    // Evidence before the credential leaves.
    state
        .shared
        .evidence
        .record(event(&decision, Some(&provider.id)))
        .await?;
    let mut answer = serde_json::Map::new();
    answer.insert("env".to_owned(), json!(binding.env));
    answer.insert("credential".to_owned(), json!(credential));
    if let Some(expires_at) = expires_at {
        answer.insert("expires_at".to_owned(), json!(expires_at));
    }
    Ok(Value::Object(answer))
}

/// A client-credentials provider's access token, fetched (or reused) as the Gateway does:
/// through the address guard, pinned to the provider's `allowed_token_hosts`; and when it stops
/// being handed out.
async fn brokered_token(
    sts: &Sts,
    directive: &crate::wire::Upstream,
    resource: &str,
) -> Result<(String, std::time::Instant), TokenError> {
    let client = sts
        .provider_client
        .get_or_init(|| {
            crate::gateway::upstream_client()
                .inspect_err(
                    |error| tracing::error!(%error, "no client for providers' token endpoints"),
                )
                .ok()
        })
        .as_ref()
        .ok_or_else(unavailable_credential)?;
    sts.provider_tokens
        .token_until(client, directive, &sts.provider_host_allowlist)
        .await
        .map_err(|error| {
            tracing::warn!(%error, resource, "a launcher's provider token is unavailable");
            unavailable_credential()
        })
}

fn unavailable_credential() -> TokenError {
    let mut error = TokenError::denied("the provider credential is unavailable");
    error.status = StatusCode::BAD_GATEWAY;
    error.code = "http_request_failed";
    error
}

/// The provider's configuration says `allow_runtime_injection: true`.
fn runtime_injection_allowed(config: &str) -> bool {
    serde_json::from_str::<Value>(config)
        .ok()
        .and_then(|config| {
            config
                .get("allow_runtime_injection")
                .and_then(Value::as_bool)
        })
        .unwrap_or(false)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests stop loudly"
)]
mod tests {
    use caracal_core::Role;
    use caracal_store::now_ms;
    use http::StatusCode;
    use serde_json::{Value, json};

    use super::super::tests::{World, world};
    use crate::state::RoleState;
    use crate::test_support::call;

    /// A workload of the world's zone with one binding per `(env, provider, extra)`: each a
    /// provider, a resource `resource://<env in lower case>` with the scope `read` behind it,
    /// and the binding (its fields and `extra`'s). The workload's id and secret.
    async fn workload(world: &World, bound: &[(&str, Value, Value)]) -> (String, String) {
        let w = Some(world.writer.as_str());
        let base = format!("/v1/zones/{}", world.zone_id);
        let created = |path: String, body: Value| async move {
            let (status, _, created) = call(&world.api, "POST", &path, w, &body.to_string()).await;
            assert_eq!(status, StatusCode::CREATED, "{created}");
            created
        };
        let mut bindings = Vec::new();
        for (env, provider, extra) in bound {
            let provider = created(format!("{base}/providers"), provider.clone()).await;
            let identifier = format!("resource://{}", env.to_lowercase());
            let resource = json!({"name": env, "identifier": identifier, "scopes": ["read"],
                                  "upstream_url": "http://127.0.0.1:9/", "credential_provider_id": provider["id"]});
            created(format!("{base}/resources"), resource).await;
            let mut binding = json!({"env": env, "resource": identifier, "scopes": ["read"]});
            if let (Some(binding), Some(extra)) = (binding.as_object_mut(), extra.as_object()) {
                binding.extend(extra.clone());
            }
            bindings.push(binding);
        }
        let workload = created(
            format!("{base}/workloads"),
            json!({"name": "nightly-report"}),
        )
        .await;
        let id = workload["id"].as_str().unwrap().to_owned();
        let (status, _, updated) = call(
            &world.api,
            "PUT",
            &format!("{base}/workloads/{id}"),
            w,
            &json!({"bindings": bindings}).to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{updated}");
        (id, workload["secret"].as_str().unwrap().to_owned())
    }

    /// Bound to an API key that may be injected and to a bearer token that may not (optional).
    async fn launcher(world: &World) -> (String, String) {
        workload(
            world,
            &[
                (
                    "BILLING_KEY",
                    json!({"name": "billing key", "kind": "api_key",
                           "config_json": {"header": "x-api-key", "api_key": "sk-live-1", "allow_runtime_injection": true}}),
                    json!({}),
                ),
                (
                    "NOTES_TOKEN",
                    json!({"name": "notes token", "kind": "bearer_token", "config_json": {"bearer_token": "nt-1"}}),
                    json!({"optional": true, "on_failure": "warn"}),
                ),
            ],
        )
        .await
    }

    fn form(id: &str, secret: &str, env: Option<&str>) -> String {
        let mut fields = vec![("workload_id", id), ("secret", secret)];
        fields.extend(env.map(|env| ("env", env)));
        serde_urlencoded::to_string(fields).unwrap()
    }

    async fn post(world: &World, path: &str, body: &str) -> (StatusCode, Value) {
        let (status, _, answer) = world
            .post(path, "application/x-www-form-urlencoded", body)
            .await;
        (status, answer)
    }

    async fn injections(world: &World) -> Vec<Value> {
        crate::test_support::stream_events(&world.shared)
            .await
            .into_iter()
            .filter(|event| event["event_type"] == "credential_injection")
            .collect()
    }

    #[tokio::test]
    async fn a_workload_gets_its_bindings_and_each_credential_the_binding_and_policy_allow() {
        let world = world().await;
        let (id, secret) = launcher(&world).await;

        let (status, manifest) = post(&world, "/v1/run/manifest", &form(&id, &secret, None)).await;
        assert_eq!(status, StatusCode::OK, "{manifest}");
        assert_eq!(manifest["zone_id"], world.zone_id.as_str());
        assert_eq!(manifest["workload_id"], id.as_str());
        let envs: Vec<&str> = manifest["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|binding| binding["env"].as_str())
            .collect();
        assert_eq!(envs, ["BILLING_KEY", "NOTES_TOKEN"]);
        assert_eq!(manifest["bindings"][1]["on_failure"], "warn");

        let (status, released) = post(
            &world,
            "/v1/run/credential",
            &form(&id, &secret, Some("BILLING_KEY")),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{released}");
        assert_eq!(
            released,
            json!({"env": "BILLING_KEY", "credential": "sk-live-1"})
        );
        let events = injections(&world).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["decision"], "allow");
        assert_eq!(
            events[0]["determining_policies_json"][0]["policy"],
            "caracal-workload-mint"
        );
        assert!(
            !events[0].to_string().contains("sk-live-1"),
            "{}",
            events[0]
        );

        // The provider does not allow runtime injection: refused, and recorded.
        let (status, refused) = post(
            &world,
            "/v1/run/credential",
            &form(&id, &secret, Some("NOTES_TOKEN")),
        )
        .await;
        assert_eq!(
            (status, refused["error"].as_str()),
            (StatusCode::FORBIDDEN, Some("access_denied")),
            "{refused}"
        );
        assert!(
            refused["error_description"]
                .as_str()
                .unwrap()
                .contains("allow_runtime_injection"),
            "{refused}"
        );
        let events = injections(&world).await;
        assert_eq!(events.last().unwrap()["decision"], "deny");
        assert!(!refused.to_string().contains("nt-1"));

        // A restriction in the zone's policy stops the release.
        let restricted = "# caracal:data-document\npackage caracal.authz\nimport rego.v1\nrestrict := [\"incident 7\"]\n";
        world.activate(restricted).await;
        world
            .core
            .policies
            .refresh_all(world.shared.store.as_ref(), "sts-test")
            .await
            .unwrap();
        let (status, refused) = post(
            &world,
            "/v1/run/credential",
            &form(&id, &secret, Some("BILLING_KEY")),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
        assert_eq!(
            refused["error_description"],
            "policy denied (restriction_active)"
        );
    }

    #[tokio::test]
    async fn a_client_credentials_binding_gets_a_token_fetched_through_the_address_guard() {
        let world = world().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let token_endpoint = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/token",
            axum::routing::post(|| async {
                axum::Json(
                    json!({"access_token": "cc-1", "token_type": "Bearer", "expires_in": 300}),
                )
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let provider = |token_url: String| {
            json!({"name": token_url, "kind": "oauth2_client_credentials",
                   "config_json": {"token_url": token_url, "client_id": "launcher",
                                   "client_secret": "cc-secret", "allow_runtime_injection": true}})
        };
        let (id, secret) = workload(
            &world,
            &[
                (
                    "REPORTS_TOKEN",
                    provider(format!("http://{token_endpoint}/token")),
                    json!({}),
                ),
                (
                    "METADATA_TOKEN",
                    provider("http://169.254.169.254/token".to_owned()),
                    json!({}),
                ),
            ],
        )
        .await;

        let (status, released) = post(
            &world,
            "/v1/run/credential",
            &form(&id, &secret, Some("REPORTS_TOKEN")),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{released}");
        assert_eq!(released["credential"], "cc-1");
        // It is handed out until shortly before the provider said it expires.
        let now = now_ms() / 1000;
        let expires_at = released["expires_at"].as_i64().unwrap();
        assert!(now < expires_at && expires_at <= now + 300, "{released}");
        // A token endpoint at a metadata address is never called.
        let (status, refused) = post(
            &world,
            "/v1/run/credential",
            &form(&id, &secret, Some("METADATA_TOKEN")),
        )
        .await;
        assert_eq!(
            (status, refused["error"].as_str()),
            (StatusCode::BAD_GATEWAY, Some("http_request_failed")),
            "{refused}"
        );
        assert!(!refused.to_string().contains("cc-secret"));
    }

    #[tokio::test]
    async fn the_run_routes_refuse_bad_input_and_fail_closed() {
        let world = world().await;
        let (id, secret) = launcher(&world).await;
        let credential = |env: &str| form(&id, &secret, Some(env));
        for (path, content_type, body, status, code) in [
            (
                "/v1/run/manifest",
                "application/x-www-form-urlencoded",
                form(&id, "ws_wrong", None),
                StatusCode::UNAUTHORIZED,
                "access_denied",
            ),
            (
                "/v1/run/manifest",
                "application/x-www-form-urlencoded",
                form("no-such-workload", &secret, None),
                StatusCode::UNAUTHORIZED,
                "access_denied",
            ),
            (
                "/v1/run/manifest",
                "application/x-www-form-urlencoded",
                form("../x", &secret, None),
                StatusCode::UNAUTHORIZED,
                "access_denied",
            ),
            (
                "/v1/run/manifest",
                "application/json",
                json!({"workload_id": id, "secret": secret}).to_string(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_token",
            ),
            (
                "/v1/run/manifest",
                "application/x-www-form-urlencoded",
                format!("{}&secret=again", form(&id, &secret, None)),
                StatusCode::BAD_REQUEST,
                "invalid_token",
            ),
            (
                "/v1/run/manifest",
                "application/x-www-form-urlencoded",
                "workload_id=%zz".to_owned(),
                StatusCode::BAD_REQUEST,
                "invalid_token",
            ),
            (
                "/v1/run/credential",
                "application/x-www-form-urlencoded",
                credential("UNBOUND"),
                StatusCode::BAD_REQUEST,
                "invalid_token",
            ),
            (
                "/v1/run/manifest?workload_id=x",
                "application/x-www-form-urlencoded",
                form(&id, &secret, None),
                StatusCode::BAD_REQUEST,
                "invalid_token",
            ),
        ] {
            let (got, _, answer) = world.post(path, content_type, &body).await;
            assert_eq!(
                (got, answer["error"].as_str()),
                (status, Some(code)),
                "{path} {body}: {answer}"
            );
            assert!(answer["requestId"].is_string(), "{answer}");
        }
        // A launch id that is not a UUID.
        let response = tower::ServiceExt::oneshot(
            world.sts.clone(),
            http::Request::post("/v1/run/manifest")
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-caracal-launch-id", "not-a-uuid")
                .body(axum::body::Body::from(form(&id, &secret, None)))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);

        // Evidence lost: no credential leaves.
        let (evidence, _lost) = crate::test_support::lost_evidence().await;
        let mut shared = world.shared.clone();
        shared.evidence = evidence;
        let mut state = RoleState::new(Role::Sts, shared);
        state.sts = Some(world.core.clone());
        let response = tower::ServiceExt::oneshot(
            crate::router(state),
            http::Request::post("/v1/run/credential")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(axum::body::Body::from(credential("BILLING_KEY")))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        let answer: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            answer["error_description"], "audit evidence could not be recorded",
            "{answer}"
        );

        // The store down: refused, never a credential.
        world
            .store
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (status, answer) = post(&world, "/v1/run/credential", &credential("BILLING_KEY")).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("sts_unavailable")),
            "{answer}"
        );
        world
            .store
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);

        // Contained zone: refused.
        let contain = json!({"fail_closed": true, "zone_id": world.zone_id, "reason": "drill"});
        let (status, _, state) = call(
            &world.api,
            "POST",
            "/v1/incident/contain",
            Some(&world.writer),
            &contain.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{state}");
        let (status, answer) = post(&world, "/v1/run/credential", &credential("BILLING_KEY")).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("contained")),
            "{answer}"
        );
    }
}

#[cfg(test)]
mod env_names {
    use proptest::prelude::*;

    use super::{BLOCKED_ENV, check_env_name};

    proptest! {
        /// Whatever the name, the check answers; what passes is an upper-case name that
        /// changes neither what runs nor Caracal's own settings.
        #[test]
        fn only_safe_upper_case_names_pass(name in prop_oneof![
            "[A-Z_][A-Z0-9_]{0,20}",
            "(LD_|DYLD_|CARACAL_)[A-Z0-9_]{0,8}",
            proptest::sample::select(BLOCKED_ENV.to_vec()).prop_map(str::to_owned),
            any::<String>(),
        ]) {
            if check_env_name(&name).is_ok() {
                prop_assert!(name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'));
                prop_assert!(!name.is_empty() && !name.as_bytes()[0].is_ascii_digit());
                prop_assert!(!BLOCKED_ENV.contains(&name.as_str()));
                prop_assert!(!["LD_", "DYLD_", "CARACAL_"].iter().any(|prefix| name.starts_with(prefix)));
            }
        }
    }
}
