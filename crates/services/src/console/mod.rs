//! The Console role (port 3001): server-rendered pages for operators, no script at all. Sign-in
//! takes an admin token; the session lives in this process's memory (cookie `HttpOnly`,
//! `SameSite=Strict`, idle and absolute expiry) and every page re-checks the token, so a revoked
//! token signs its sessions out. Every read and change goes through the admin API's own routes
//! in process with the session's token, so the console is authorised, validated and audited
//! exactly as the API is, and a read token is refused a change there even if a form is forged.
//! Forms carry a per-session CSRF token; pages carry a strict Content-Security-Policy and are
//! never framed or cached; every value is HTML-escaped. Screens: overview, zones, a zone (its
//! applications, providers, resources, policy sets, sessions and pending approvals), a zone's
//! audit with filters and the chain status, and incident containment (contain and release with
//! a reason).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caracal_core::Role;
use caracal_store::now_ms;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::Value;
use tower::ServiceExt as _;

use crate::state::RoleState;

const COOKIE: &str = "caracal_console";
/// What a local account's admin token is sealed for (`caracal console add-user`).
pub const USER_TOKEN_PURPOSE: &str = "console-user-token";
/// The sign-in form's own CSRF cookie (no session exists yet).
const SIGN_IN_COOKIE: &str = "caracal_console_sign_in";
const IDLE_MS: i64 = 30 * 60 * 1000;
const ABSOLUTE_MS: i64 = 12 * 3600 * 1000;
const CSS: &str = include_str!("console.css");
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// Signed-in sessions of this process, by cookie value.
#[derive(Clone, Default)]
pub struct Sessions(Arc<Mutex<HashMap<String, Session>>>);

#[derive(Clone)]
struct Session {
    /// Held to call the admin API on the operator's behalf; never rendered.
    token: String,
    csrf: String,
    writer: bool,
    created_ms: i64,
    seen_ms: i64,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/", get(index))
        .route("/sign-in", get(sign_in_page).post(sign_in))
        .route("/sign-out", axum::routing::post(sign_out))
        .route("/overview", get(overview))
        .route("/zones", get(zones).post(create_zone))
        .route("/zones/{zone_id}", get(zone))
        .route("/zones/{zone_id}/act", axum::routing::post(act))
        .route("/zones/{zone_id}/sessions", get(sessions_page))
        .route(
            "/zones/{zone_id}/policy-sets/{set_id}",
            get(policy_set_page).post(policy_set_action),
        )
        .route(
            "/zones/{zone_id}/sessions/{session_id}/terminate",
            get(terminate_preview).post(terminate),
        )
        .route("/zones/{zone_id}/audit", get(audit))
        .route("/zones/{zone_id}/audit/{request_id}", get(explain))
        .route("/zones/{zone_id}/timeline", get(timeline))
        .route("/incident", get(incident).post(contain_or_release))
        .route("/static/console.css", get(css))
}

/// Text as HTML: safe in element content and in quoted attributes.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

fn random_token() -> Option<String> {
    let bytes: [u8; 32] = caracal_crypto::random_bytes().ok()?;
    Some(URL_SAFE_NO_PAD.encode(bytes))
}

/// Equal without an early exit, so a guess learns nothing from timing.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
}

/// A page with the security headers every console answer carries.
fn html(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn redirect(to: &'static str) -> Response {
    let mut response = html(StatusCode::SEE_OTHER, String::new());
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    response
}

fn layout(title: &str, session: Option<&Session>, body: &str) -> String {
    let bar = match session {
        Some(session) => format!(
            "<nav><a href=\"/overview\">Overview</a> <a href=\"/zones\">Zones</a> \
             <a href=\"/incident\">Incident</a></nav>\
             <span>{}</span>\
             <form method=\"post\" action=\"/sign-out\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button>Sign out</button></form>",
            if session.writer { "write" } else { "read only" },
            escape(&session.csrf)
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · Caracal</title>\
         <link rel=\"stylesheet\" href=\"/static/console.css\"></head><body>\
         <header><strong>Caracal</strong>{bar}</header><main><h1>{}</h1>{body}</main></body></html>",
        escape(title),
        escape(title)
    )
}

fn error_page(status: StatusCode, session: Option<&Session>, message: &str) -> Response {
    html(
        status,
        layout(
            "Refused",
            session,
            &format!("<p class=\"error\">{}</p>", escape(message)),
        ),
    )
}

async fn css() -> Response {
    let mut response = CSS.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    response
}

/// The signed-in session of the request, refreshed; `None` when absent, expired, or its token
/// no longer valid.
async fn session(state: &RoleState, headers: &HeaderMap) -> Option<(String, Session)> {
    let id = cookie(headers, COOKIE)?;
    let now = now_ms();
    let found = {
        let mut sessions = state.console.lock();
        sessions.retain(|_, session| {
            now - session.seen_ms < IDLE_MS && now - session.created_ms < ABSOLUTE_MS
        });
        sessions.get(&id).cloned()
    }?;
    let token = caracal_crypto::AdminToken::parse(&found.token)?;
    if crate::auth::caller_of(state, &token.digest())
        .await
        .is_err()
    {
        state.console.lock().remove(&id);
        return None;
    }
    if let Some(session) = state.console.lock().get_mut(&id) {
        session.seen_ms = now;
    }
    Some((id, found))
}

/// Calls the admin API's own route with the session's token; status and JSON answer.
async fn admin(
    state: &RoleState,
    session: &Session,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let app = crate::admin::routes()
        .merge(crate::api::routes())
        .with_state(RoleState::new(Role::Api, state.shared.clone()));
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {}", session.token))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            body.map(|body| body.to_string()).unwrap_or_default(),
        ));
    let Ok(request) = request else {
        return (StatusCode::BAD_REQUEST, Value::Null);
    };
    match app.oneshot(request).await {
        Ok(response) => {
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            (
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            )
        }
        Err(never) => match never {},
    }
}

fn refusal(answer: &Value) -> String {
    format!(
        "{} ({})",
        answer
            .get("error_description")
            .and_then(Value::as_str)
            .unwrap_or("refused"),
        answer.get("error").and_then(Value::as_str).unwrap_or("")
    )
}

async fn index(State(state): State<RoleState>, headers: HeaderMap) -> Response {
    match session(&state, &headers).await {
        Some(_) => redirect("/overview"),
        None => redirect("/sign-in"),
    }
}

async fn sign_in_page() -> Response {
    let Some(csrf) = random_token() else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, None, "no randomness");
    };
    let form = format!(
        "<form method=\"post\" action=\"/sign-in\" class=\"card\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <p><label>Admin token<br><input type=\"password\" name=\"token\" autocomplete=\"off\"></label></p>\
         <p>or, with a local account (<code>caracal console add-user</code>):</p>\
         <p><label>Email<br><input type=\"text\" name=\"email\" autocomplete=\"username\"></label></p>\
         <p><label>Password<br><input type=\"password\" name=\"password\" autocomplete=\"current-password\"></label></p>\
         <p><button>Sign in</button></p></form>"
    );
    let mut response = html(StatusCode::OK, layout("Sign in", None, &form));
    if let Ok(value) = HeaderValue::from_str(&format!(
        "{SIGN_IN_COOKIE}={csrf}; Path=/sign-in; HttpOnly; SameSite=Strict"
    )) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

#[derive(Deserialize)]
struct SignInForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    csrf: String,
}

/// The admin token of a local account whose password is `password`; `None` otherwise. An
/// unknown email costs the same hash check as a wrong password, so timing tells nothing.
async fn account_token(state: &RoleState, email: &str, password: String) -> Option<String> {
    static DECOY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let email = email.trim().to_ascii_lowercase();
    let user = state.shared.store.console_user(&email).await.ok().flatten();
    let stored = match &user {
        Some(user) => user.password_hash.clone(),
        None => DECOY
            .get_or_init(|| caracal_crypto::hash_secret("no account has this password").ok())
            .clone()?,
    };
    let matches =
        tokio::task::spawn_blocking(move || caracal_crypto::verify_secret(&password, &stored))
            .await
            .unwrap_or(false);
    let user = user.filter(|_| matches)?;
    let opened = state
        .shared
        .kek
        .open(USER_TOKEN_PURPOSE, &user.token_envelope)
        .ok()?;
    String::from_utf8(opened).ok()
}

async fn sign_in(State(state): State<RoleState>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(form) = serde_urlencoded::from_bytes::<SignInForm>(&body) else {
        return error_page(StatusCode::BAD_REQUEST, None, "the form is incomplete");
    };
    let expected = cookie(&headers, SIGN_IN_COOKIE).unwrap_or_default();
    if expected.is_empty() || !same(&expected, &form.csrf) {
        return error_page(
            StatusCode::FORBIDDEN,
            None,
            "the form expired or did not come from this console: reload the sign-in page",
        );
    }
    let token = if form.token.trim().is_empty() && !form.email.trim().is_empty() {
        account_token(&state, &form.email, form.password)
            .await
            .unwrap_or_default()
    } else {
        form.token.trim().to_owned()
    };
    let caller = match caracal_crypto::AdminToken::parse(&token) {
        Some(parsed) => crate::auth::caller_of(&state, &parsed.digest()).await.ok(),
        None => None,
    };
    let Some(caller) = caller else {
        return error_page(
            StatusCode::UNAUTHORIZED,
            None,
            "that admin token, or that email and password, is not valid",
        );
    };
    let (Some(id), Some(csrf)) = (random_token(), random_token()) else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, None, "no randomness");
    };
    let now = now_ms();
    let writer = caller
        .require(
            crate::auth::Access::Write,
            match &caller.scope {
                caracal_store::TokenScope::Global => None,
                caracal_store::TokenScope::Zone(zone) => Some(zone.as_str()),
            },
        )
        .is_ok();
    state.console.lock().insert(
        id.clone(),
        Session {
            token,
            csrf,
            writer,
            created_ms: now,
            seen_ms: now,
        },
    );
    let mut response = redirect("/overview");
    if let Ok(value) = HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        ABSOLUTE_MS / 1000
    )) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn sign_out(State(state): State<RoleState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some((id, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let form = serde_urlencoded::from_bytes::<CsrfForm>(&body).ok();
    if !form.is_some_and(|form| same(&form.csrf, &session.csrf)) {
        return error_page(StatusCode::FORBIDDEN, Some(&session), "missing CSRF token");
    }
    state.console.lock().remove(&id);
    let mut response = redirect("/sign-in");
    response.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static("caracal_console=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

async fn overview(State(state): State<RoleState>, headers: HeaderMap) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let mut body = String::new();
    let (status, containment) =
        admin(&state, &session, "GET", "/v1/incident/containment", None).await;
    body.push_str("<section class=\"card\"><h2>Containment</h2>");
    match containment.get("switches").and_then(Value::as_array) {
        Some(switches) if switches.is_empty() => {
            body.push_str("<p class=\"good\">Nothing contained.</p>");
        }
        Some(switches) => {
            body.push_str("<table><tr><th>Switch</th><th>Zone</th><th>Reason</th><th>By</th></tr>");
            for switch in switches {
                let field =
                    |name: &str| escape(switch.get(name).and_then(Value::as_str).unwrap_or(""));
                body.push_str(&format!(
                    "<tr><td class=\"bad\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    field("kind"),
                    field("zone_id"),
                    field("reason"),
                    field("actor")
                ));
            }
            body.push_str("</table>");
        }
        None => body.push_str(&format!(
            "<p>Not shown: {} ({})</p>",
            escape(&refusal(&containment)),
            status.as_u16()
        )),
    }
    body.push_str("</section>");
    let (_, tamper) = admin(&state, &session, "GET", "/v1/audit/tamper", None).await;
    let findings = tamper.get("items").and_then(Value::as_array).map(Vec::len);
    body.push_str(&format!(
        "<section class=\"card\"><h2>Audit</h2><p>{}</p></section>",
        match findings {
            Some(0) => "<span class=\"good\">No open tamper finding.</span>".to_owned(),
            Some(n) => format!("<span class=\"bad\">{n} open tamper finding(s).</span>"),
            None => escape(&refusal(&tamper)),
        }
    ));
    let (_, zones) = admin(&state, &session, "GET", "/v1/zones?limit=500", None).await;
    let count = zones
        .get("items")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    body.push_str(&format!(
        "<section class=\"card\"><h2>Zones</h2><p>{count} zone(s). <a href=\"/zones\">See them</a>.</p></section>"
    ));
    html(StatusCode::OK, layout("Overview", Some(&session), &body))
}

async fn zones(State(state): State<RoleState>, headers: HeaderMap) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    zones_page(&state, &session, None).await
}

async fn zones_page(state: &RoleState, session: &Session, notice: Option<String>) -> Response {
    let (status, zones) = admin(state, session, "GET", "/v1/zones?limit=500", None).await;
    let mut body = notice.unwrap_or_default();
    match zones.get("items").and_then(Value::as_array) {
        Some(items) => {
            body.push_str("<table><tr><th>Name</th><th>Slug</th><th>Id</th><th>Created</th></tr>");
            for zone in items {
                let field =
                    |name: &str| escape(zone.get(name).and_then(Value::as_str).unwrap_or(""));
                body.push_str(&format!(
                    "<tr><td class=\"zone-name\"><a href=\"/zones/{}\">{}</a></td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
                    field("id"),
                    field("name"),
                    field("slug"),
                    field("id"),
                    field("created_at")
                ));
            }
            body.push_str("</table>");
        }
        None => {
            return error_page(status, Some(session), &refusal(&zones));
        }
    }
    // A read-only sign-in sees no mutating control (and the API refuses one anyway).
    if session.writer {
        body.push_str(&format!(
            "<form method=\"post\" action=\"/zones\" class=\"card\"><h2>New zone</h2>\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <p><label>Name<br><input type=\"text\" name=\"name\" required></label></p>\
             <p><button>Create</button></p></form>",
            escape(&session.csrf)
        ));
    }
    html(StatusCode::OK, layout("Zones", Some(session), &body))
}

#[derive(Deserialize)]
struct ZoneForm {
    csrf: String,
    name: String,
}

async fn create_zone(State(state): State<RoleState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let Ok(form) = serde_urlencoded::from_bytes::<ZoneForm>(&body) else {
        return error_page(StatusCode::FORBIDDEN, Some(&session), "missing CSRF token");
    };
    if !same(&form.csrf, &session.csrf) {
        return error_page(StatusCode::FORBIDDEN, Some(&session), "missing CSRF token");
    }
    let (status, answer) = admin(
        &state,
        &session,
        "POST",
        "/v1/zones",
        Some(serde_json::json!({ "name": form.name })),
    )
    .await;
    if !status.is_success() {
        return error_page(status, Some(&session), &refusal(&answer));
    }
    let notice = format!(
        "<p class=\"good\">Zone {} created.</p>",
        escape(answer.get("name").and_then(Value::as_str).unwrap_or(""))
    );
    zones_page(&state, &session, Some(notice)).await
}

/// A table's columns: header and JSON pointer.
type Columns<'a> = &'a [(&'a str, &'a str)];

/// `items` of a list answer as a table of `columns` (header, JSON pointer), every cell escaped;
/// the refusal when the answer is not a list.
fn table(answer: &Value, columns: &[(&str, &str)]) -> String {
    let Some(items) = answer.get("items").and_then(Value::as_array) else {
        return format!("<p>Not shown: {}</p>", escape(&refusal(answer)));
    };
    if items.is_empty() {
        return "<p>None.</p>".to_owned();
    }
    let mut html = String::from("<table><tr>");
    for (header, _) in columns {
        html.push_str(&format!("<th>{}</th>", escape(header)));
    }
    html.push_str("</tr>");
    for item in items {
        html.push_str("<tr>");
        for (_, pointer) in columns {
            let cell = match item.pointer(pointer) {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            html.push_str(&format!("<td>{}</td>", escape(&cell)));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    html
}

/// A zone id from a path, or `None` when it is not a plain id (nothing else reaches the API).
fn zone_path(zone_id: &str) -> Option<&str> {
    caracal_core::is_plain_id(zone_id).then_some(zone_id)
}

async fn zone(
    State(state): State<RoleState>,
    headers: HeaderMap,
    axum::extract::Path(zone_id): axum::extract::Path<String>,
) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let Some(zone_id) = zone_path(&zone_id) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such zone");
    };
    let base = format!("/v1/zones/{zone_id}");
    let (status, zone) = admin(&state, &session, "GET", &base, None).await;
    if !status.is_success() {
        return error_page(status, Some(&session), &refusal(&zone));
    }
    let name = zone.get("name").and_then(Value::as_str).unwrap_or("");
    let mut body = format!(
        "<p><code>{}</code> · <a href=\"/zones/{}/audit\">Audit</a> · \
         <a href=\"/zones/{}/timeline\">Timeline</a> · \
         <a href=\"/zones/{}/sessions\">Sessions and delegations</a></p>",
        escape(zone_id),
        escape(zone_id),
        escape(zone_id),
        escape(zone_id)
    );
    let sections: [(&str, String, Columns<'_>); 6] = [
        (
            "Applications",
            format!("{base}/applications?limit=500"),
            &[
                ("Name", "/name"),
                ("Id", "/id"),
                ("Traits", "/traits"),
                ("Created", "/created_at"),
            ],
        ),
        (
            "Providers (secrets are never shown)",
            format!("{base}/providers?limit=500"),
            &[
                ("Name", "/name"),
                ("Identifier", "/identifier"),
                ("Kind", "/kind"),
                ("Secret keys", "/secret_config_keys"),
            ],
        ),
        (
            "Resources",
            format!("{base}/resources?limit=500"),
            &[
                ("Identifier", "/identifier"),
                ("Upstream", "/upstream_url"),
                ("Scopes", "/scopes"),
                ("Operations", "/operation_enforcement"),
            ],
        ),
        (
            "Policy sets",
            format!("{base}/policy-sets?limit=500"),
            &[
                ("Name", "/name"),
                ("Id", "/id"),
                ("Active version", "/active_version_id"),
                ("Last known good", "/last_known_good_version_id"),
            ],
        ),
        (
            "Sessions",
            format!("{base}/sessions?limit=100"),
            &[
                ("Session", "/agent_session_id"),
                ("Application", "/application_id"),
                ("Parent", "/parent_id"),
                ("Status", "/status"),
                ("Labels", "/labels"),
                ("Subject", "/subject_id"),
            ],
        ),
        (
            "Pending approvals",
            format!("{base}/approvals?state=pending"),
            &[
                ("Hold", "/id"),
                ("Principal", "/principal_id"),
                ("Application", "/application_id"),
                ("Tier", "/tier"),
                ("Expires", "/expires_at"),
            ],
        ),
    ];
    for (title, path, columns) in sections {
        let (_, answer) = admin(&state, &session, "GET", &path, None).await;
        body.push_str(&format!(
            "<section class=\"card\"><h2>{}</h2>{}{}</section>",
            escape(title),
            table(&answer, columns),
            if session.writer {
                actions(title, zone_id, &session.csrf, &answer)
            } else {
                String::new()
            }
        ));
    }
    html(
        StatusCode::OK,
        layout(&format!("Zone {name}"), Some(&session), &body),
    )
}

#[derive(Deserialize, Default)]
struct AuditFilter {
    decision: Option<String>,
    event_type: Option<String>,
}

async fn audit(
    State(state): State<RoleState>,
    headers: HeaderMap,
    axum::extract::Path(zone_id): axum::extract::Path<String>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let Some(zone_id) = zone_path(&zone_id) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such zone");
    };
    let filter: AuditFilter =
        serde_urlencoded::from_str(raw.as_deref().unwrap_or_default()).unwrap_or_default();
    let mut query = vec![("limit", "100".to_owned())];
    let decision = filter
        .decision
        .filter(|decision| matches!(decision.as_str(), "allow" | "deny"));
    if let Some(decision) = &decision {
        query.push(("decision", decision.clone()));
    }
    let event_type = filter
        .event_type
        .filter(|kind| !kind.is_empty() && kind.len() <= 100);
    if let Some(kind) = &event_type {
        query.push(("event_type", kind.clone()));
    }
    let path = format!(
        "/v1/zones/{zone_id}/audit?{}",
        serde_urlencoded::to_string(&query).unwrap_or_default()
    );
    let (_, events) = admin(&state, &session, "GET", &path, None).await;
    let (_, tamper) = admin(&state, &session, "GET", "/v1/audit/tamper", None).await;
    let findings = tamper
        .get("items")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let chain = if findings == 0 {
        "<span class=\"good\">No open tamper finding: the last sweeps verified the chains.</span>"
            .to_owned()
    } else {
        format!("<span class=\"bad\">{findings} open tamper finding(s).</span>")
    };
    let body = format!(
        "<section class=\"card\"><p>{chain}</p>\
         <form method=\"get\"><label>Decision <select name=\"decision\">\
         <option value=\"\">any</option><option{}>allow</option><option{}>deny</option></select></label> \
         <label>Event type <input type=\"text\" name=\"event_type\" value=\"{}\"></label> \
         <button>Filter</button></form>\
         <form method=\"get\" action=\"/zones/{}/audit/explain\"><label>Explain request \
         <input type=\"text\" name=\"request_id\"></label> <button>Explain</button></form></section>{}",
        if decision.as_deref() == Some("allow") {
            " selected"
        } else {
            ""
        },
        if decision.as_deref() == Some("deny") {
            " selected"
        } else {
            ""
        },
        escape(event_type.as_deref().unwrap_or("")),
        escape(zone_id),
        table(
            &events,
            &[
                ("When", "/occurred_at_ms"),
                ("Event", "/event_type"),
                ("Decision", "/decision"),
                ("Request", "/request_id"),
                ("Policy set version", "/policy_set_version_id")
            ],
        )
    );
    html(StatusCode::OK, layout("Audit", Some(&session), &body))
}

async fn incident(State(state): State<RoleState>, headers: HeaderMap) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    incident_page(&state, &session, None).await
}

async fn incident_page(state: &RoleState, session: &Session, notice: Option<String>) -> Response {
    let (_, containment) = admin(state, session, "GET", "/v1/incident/containment", None).await;
    let mut body = notice.unwrap_or_default();
    body.push_str(&format!(
        "<section class=\"card\"><h2>In force</h2>{}</section>",
        table(
            &serde_json::json!({ "items": containment.get("switches").cloned().unwrap_or(Value::Null) }),
            &[("Switch", "/kind"), ("Zone", "/zone_id"), ("Reason", "/reason"), ("By", "/actor")],
        )
    ));
    if session.writer {
        body.push_str(&format!(
            "<form method=\"post\" action=\"/incident\" class=\"card\"><h2>Contain or release</h2>\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <p><label>Switch <select name=\"switch\"><option value=\"freeze\">freeze changes</option>\
             <option value=\"fail_closed\">fail closed (refuse protected traffic)</option></select></label></p>\
             <p><label>Reason<br><input type=\"text\" name=\"reason\" required></label></p>\
             <p><button name=\"action\" value=\"contain\">Contain</button> \
             <button name=\"action\" value=\"release\">Release</button></p></form>",
            escape(&session.csrf)
        ));
    }
    html(StatusCode::OK, layout("Incident", Some(session), &body))
}

#[derive(Deserialize)]
struct SwitchForm {
    csrf: String,
    switch: String,
    reason: String,
    action: String,
}

async fn contain_or_release(
    State(state): State<RoleState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let form = serde_urlencoded::from_bytes::<SwitchForm>(&body).ok();
    let Some(form) = form.filter(|form| same(&form.csrf, &session.csrf)) else {
        return error_page(StatusCode::FORBIDDEN, Some(&session), "missing CSRF token");
    };
    let path = match form.action.as_str() {
        "contain" => "/v1/incident/contain",
        "release" => "/v1/incident/release",
        _ => return error_page(StatusCode::BAD_REQUEST, Some(&session), "unknown action"),
    };
    let switch = match form.switch.as_str() {
        "freeze" => serde_json::json!({ "freeze": true, "reason": form.reason }),
        "fail_closed" => serde_json::json!({ "fail_closed": true, "reason": form.reason }),
        _ => return error_page(StatusCode::BAD_REQUEST, Some(&session), "unknown switch"),
    };
    let (status, answer) = admin(&state, &session, "POST", path, Some(switch)).await;
    if !status.is_success() {
        return error_page(status, Some(&session), &refusal(&answer));
    }
    let notice = format!(
        "<p class=\"good\">{} {}: done.</p>",
        escape(&form.action),
        escape(&form.switch)
    );
    incident_page(&state, &session, Some(notice)).await
}

/// The change controls of a zone page's section, one form per item: rotate an application's
/// secret, roll a policy set back to its last known good version, decide a pending approval.
fn actions(section: &str, zone_id: &str, csrf: &str, answer: &Value) -> String {
    let (action, label, reason): (&str, &str, bool) = match section {
        "Applications" => ("rotate", "Rotate secret", false),
        "Policy sets" => ("rollback", "Roll back to last known good", false),
        "Pending approvals" => ("decide", "", true),
        _ => return String::new(),
    };
    let items = answer
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut forms = String::new();
    for item in items {
        let id = item.get("id").and_then(Value::as_str).unwrap_or("");
        let name = item.get("name").and_then(Value::as_str).unwrap_or(id);
        let buttons = if reason {
            "<input type=\"text\" name=\"reason\" placeholder=\"reason\"> \
             <button name=\"decision\" value=\"approve\">Approve</button> \
             <button name=\"decision\" value=\"reject\">Reject</button>"
                .to_owned()
        } else {
            format!("<button>{}</button>", escape(label))
        };
        if section == "Policy sets" {
            forms.push_str(&format!(
                "<p><a href=\"/zones/{}/policy-sets/{}\">{}: versions, diff, simulate</a></p>",
                escape(zone_id),
                escape(id),
                escape(name)
            ));
        }
        forms.push_str(&format!(
            "<form method=\"post\" action=\"/zones/{}/act\" class=\"action\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <input type=\"hidden\" name=\"action\" value=\"{action}\">\
             <input type=\"hidden\" name=\"id\" value=\"{}\">{} {buttons}</form>",
            escape(zone_id),
            escape(csrf),
            escape(id),
            escape(name),
        ));
    }
    forms
}

#[derive(Deserialize)]
struct ActForm {
    csrf: String,
    action: String,
    id: String,
    #[serde(default)]
    decision: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

async fn act(
    State(state): State<RoleState>,
    headers: HeaderMap,
    axum::extract::Path(zone_id): axum::extract::Path<String>,
    body: Bytes,
) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let form = serde_urlencoded::from_bytes::<ActForm>(&body).ok();
    let Some(form) = form.filter(|form| same(&form.csrf, &session.csrf)) else {
        return error_page(StatusCode::FORBIDDEN, Some(&session), "missing CSRF token");
    };
    let (Some(zone_id), true) = (zone_path(&zone_id), caracal_core::is_plain_id(&form.id)) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such object");
    };
    let id = &form.id;
    let (path, payload) = match (form.action.as_str(), form.decision.as_deref()) {
        ("rotate", _) => (
            format!("/v1/zones/{zone_id}/applications/{id}/rotate-secret"),
            serde_json::json!({}),
        ),
        ("rollback", _) => (
            format!("/v1/zones/{zone_id}/policy-sets/{id}/rollback"),
            serde_json::json!({}),
        ),
        ("decide", Some(decision @ ("approve" | "reject"))) => (
            format!("/v1/zones/{zone_id}/approvals/{id}/{decision}"),
            serde_json::json!({ "reason": form.reason.filter(|reason| !reason.is_empty()) }),
        ),
        _ => return error_page(StatusCode::BAD_REQUEST, Some(&session), "unknown action"),
    };
    let (status, answer) = admin(&state, &session, "POST", &path, Some(payload)).await;
    if !status.is_success() {
        return error_page(status, Some(&session), &refusal(&answer));
    }
    let done = match form.action.as_str() {
        // Shown once, on a page that is never cached.
        "rotate" => format!(
            "<p class=\"good\">New client secret (shown once; store it now):</p><p><code class=\"secret\">{}</code></p>",
            escape(
                answer
                    .get("client_secret")
                    .and_then(Value::as_str)
                    .unwrap_or("")
            )
        ),
        "rollback" => format!(
            "<p class=\"good\">Rolled back: version {} is active again.</p>",
            escape(
                answer
                    .get("version_id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
            )
        ),
        _ => format!(
            "<p class=\"good\">Approval {} {}.</p>",
            escape(id),
            escape(
                answer
                    .get("state")
                    .and_then(Value::as_str)
                    .unwrap_or("decided")
            )
        ),
    };
    html(
        StatusCode::OK,
        layout(
            "Done",
            Some(&session),
            &format!(
                "{done}<p><a href=\"/zones/{}\">Back to the zone</a></p>",
                escape(zone_id)
            ),
        ),
    )
}

/// A zone's sessions (at most 500) and active delegation edges, through the admin API.
async fn graph_of(
    state: &RoleState,
    session: &Session,
    zone_id: &str,
) -> Result<(Vec<Value>, Vec<Value>), Response> {
    let (status, sessions) = admin(
        state,
        session,
        "GET",
        &format!("/v1/zones/{zone_id}/sessions?limit=500"),
        None,
    )
    .await;
    let Some(sessions) = sessions.get("items").and_then(Value::as_array).cloned() else {
        return Err(error_page(status, Some(session), &refusal(&sessions)));
    };
    let (status, edges) = admin(
        state,
        session,
        "GET",
        &format!("/v1/zones/{zone_id}/delegations?status=active&limit=500"),
        None,
    )
    .await;
    let Some(edges) = edges.get("items").and_then(Value::as_array).cloned() else {
        return Err(error_page(status, Some(session), &refusal(&edges)));
    };
    Ok((sessions, edges))
}

fn text_of<'a>(value: &'a Value, field: &str) -> &'a str {
    value.get(field).and_then(Value::as_str).unwrap_or("")
}

/// The session tree (parent links, grey) and the delegation edges (blue, labelled with scopes,
/// hop budget and expiry) as SVG, drawn with presentation attributes only (no style: the CSP
/// allows none inline).
fn graph_svg(sessions: &[Value], edges: &[Value]) -> String {
    // Depth-first order from the roots, so children sit under their parent.
    let ids: std::collections::HashSet<&str> = sessions
        .iter()
        .map(|s| text_of(s, "agent_session_id"))
        .collect();
    let mut order: Vec<(&Value, usize)> = Vec::new();
    let mut stack: Vec<(&Value, usize)> = sessions
        .iter()
        .filter(|s| {
            let parent = text_of(s, "parent_id");
            parent.is_empty() || !ids.contains(parent)
        })
        .map(|s| (s, 0))
        .rev()
        .collect();
    while let Some((node, depth)) = stack.pop() {
        if order.len() > sessions.len() {
            break;
        }
        order.push((node, depth));
        let id = text_of(node, "agent_session_id");
        for child in sessions
            .iter()
            .rev()
            .filter(|s| text_of(s, "parent_id") == id)
        {
            stack.push((child, depth + 1));
        }
    }
    let position: HashMap<&str, (usize, usize)> = order
        .iter()
        .enumerate()
        .map(|(row, (node, depth))| {
            (
                text_of(node, "agent_session_id"),
                (20 + depth * 200, 30 + row * 48),
            )
        })
        .collect();
    let height = 40 + order.len() * 48;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1100\" height=\"{height}\" role=\"img\" aria-label=\"sessions and delegations\">"
    );
    for (node, _) in &order {
        let parent = text_of(node, "parent_id");
        if let (Some((px, py)), Some((x, y))) = (
            position.get(parent),
            position.get(text_of(node, "agent_session_id")),
        ) {
            svg.push_str(&format!(
                "<line x1=\"{}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#9aa3ad\"/>",
                px + 10,
                py + 14,
                y + 14
            ));
        }
    }
    for edge in edges {
        let (Some((sx, sy)), Some((tx, ty))) = (
            position.get(text_of(edge, "source_session_id")),
            position.get(text_of(edge, "target_session_id")),
        ) else {
            continue;
        };
        let scopes: Vec<&str> = edge
            .get("scopes")
            .and_then(Value::as_array)
            .map(|scopes| scopes.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let hops = edge
            .get("max_hops")
            .map_or_else(|| "-".to_owned(), Value::to_string);
        let label = format!(
            "{} · hops {} · until {}",
            scopes.join(" "),
            hops,
            text_of(edge, "expires_at")
        );
        let (x1, y1, x2, y2) = (sx + 160, sy + 14, tx + 160, ty + 14);
        let bend = x1.max(x2) + 60;
        svg.push_str(&format!(
            "<path d=\"M {x1} {y1} C {bend} {y1}, {bend} {y2}, {x2} {y2}\" fill=\"none\" stroke=\"#1f6feb\" stroke-width=\"2\"><title>{}</title></path>\
             <text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#1f6feb\" class=\"edge-label\">{}</text>",
            escape(&label),
            bend + 4,
            (y1 + y2) / 2,
            escape(&label)
        ));
    }
    for (node, _) in &order {
        let id = text_of(node, "agent_session_id");
        let Some((x, y)) = position.get(id) else {
            continue;
        };
        let status = text_of(node, "status");
        let fill = if status == "active" {
            "#e7f5ec"
        } else {
            "#f3f4f6"
        };
        let short: String = id.chars().take(18).collect();
        svg.push_str(&format!(
            "<rect x=\"{x}\" y=\"{y}\" width=\"160\" height=\"28\" rx=\"4\" fill=\"{fill}\" stroke=\"#6b7280\"><title>{}</title></rect>\
             <text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#1d232a\" class=\"session-node\">{} · {}</text>",
            escape(id),
            x + 6,
            y + 18,
            escape(&short),
            escape(status)
        ));
    }
    svg.push_str("</svg>");
    svg
}

async fn sessions_page(
    State(state): State<RoleState>,
    headers: HeaderMap,
    axum::extract::Path(zone_id): axum::extract::Path<String>,
) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let Some(zone_id) = zone_path(&zone_id) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such zone");
    };
    let (sessions, edges) = match graph_of(&state, &session, zone_id).await {
        Ok(graph) => graph,
        Err(refused) => return refused,
    };
    let mut body = format!(
        "<section class=\"card\"><h2>Graph</h2>{}</section><section class=\"card\"><h2>Sessions</h2><table>\
         <tr><th>Session</th><th>Application</th><th>Parent</th><th>Status</th><th></th></tr>",
        graph_svg(&sessions, &edges)
    );
    for item in &sessions {
        let id = text_of(item, "agent_session_id");
        let live = matches!(text_of(item, "status"), "active" | "suspended");
        let terminate = if session.writer && live {
            format!(
                "<a href=\"/zones/{}/sessions/{}/terminate\">Terminate…</a>",
                escape(zone_id),
                escape(id)
            )
        } else {
            String::new()
        };
        body.push_str(&format!(
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{terminate}</td></tr>",
            escape(id),
            escape(text_of(item, "application_id")),
            escape(text_of(item, "parent_id")),
            escape(text_of(item, "status"))
        ));
    }
    body.push_str("</table></section>");
    html(
        StatusCode::OK,
        layout("Sessions and delegations", Some(&session), &body),
    )
}

/// The session, its descendants, and the active edges touching any of them: what a
/// termination ends.
fn impact<'a>(
    root: &'a str,
    sessions: &'a [Value],
    edges: &'a [Value],
) -> (Vec<&'a str>, Vec<&'a Value>) {
    let mut ended = vec![root];
    let mut next = 0;
    while let Some(current) = ended.get(next).copied() {
        for child in sessions
            .iter()
            .filter(|s| text_of(s, "parent_id") == current)
        {
            let id = text_of(child, "agent_session_id");
            if !ended.contains(&id) {
                ended.push(id);
            }
        }
        next += 1;
    }
    let touched = edges
        .iter()
        .filter(|edge| {
            ended.contains(&text_of(edge, "source_session_id"))
                || ended.contains(&text_of(edge, "target_session_id"))
        })
        .collect();
    (ended, touched)
}

async fn terminate_preview(
    State(state): State<RoleState>,
    headers: HeaderMap,
    axum::extract::Path((zone_id, session_id)): axum::extract::Path<(String, String)>,
) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let (Some(zone_id), true) = (zone_path(&zone_id), caracal_core::is_plain_id(&session_id))
    else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such session");
    };
    let (sessions, edges) = match graph_of(&state, &session, zone_id).await {
        Ok(graph) => graph,
        Err(refused) => return refused,
    };
    if !sessions
        .iter()
        .any(|s| text_of(s, "agent_session_id") == session_id)
    {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such session");
    }
    let (ended, touched) = impact(&session_id, &sessions, &edges);
    let mut body = format!(
        "<section class=\"card\"><h2>Impact</h2><p class=\"impact\">Terminating ends {} session(s) and revokes {} delegation(s):</p><ul>",
        ended.len(),
        touched.len()
    );
    for id in &ended {
        body.push_str(&format!("<li>session <code>{}</code></li>", escape(id)));
    }
    for edge in &touched {
        body.push_str(&format!(
            "<li>delegation <code>{}</code> ({} → {})</li>",
            escape(text_of(edge, "id")),
            escape(text_of(edge, "source_session_id")),
            escape(text_of(edge, "target_session_id"))
        ));
    }
    body.push_str("</ul></section>");
    if session.writer {
        body.push_str(&format!(
            "<form method=\"post\" class=\"card\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <p><label>Reason<br><input type=\"text\" name=\"reason\" required></label></p>\
             <p><button>Terminate</button></p></form>",
            escape(&session.csrf)
        ));
    }
    html(
        StatusCode::OK,
        layout("Terminate a session", Some(&session), &body),
    )
}

#[derive(Deserialize)]
struct ReasonForm {
    csrf: String,
    reason: String,
}

async fn terminate(
    State(state): State<RoleState>,
    headers: HeaderMap,
    axum::extract::Path((zone_id, session_id)): axum::extract::Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let form = serde_urlencoded::from_bytes::<ReasonForm>(&body).ok();
    let Some(form) = form.filter(|form| same(&form.csrf, &session.csrf)) else {
        return error_page(StatusCode::FORBIDDEN, Some(&session), "missing CSRF token");
    };
    let (Some(zone_id), true) = (zone_path(&zone_id), caracal_core::is_plain_id(&session_id))
    else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such session");
    };
    let (status, answer) = admin(
        &state,
        &session,
        "POST",
        &format!("/v1/zones/{zone_id}/sessions/{session_id}/terminate"),
        Some(serde_json::json!({ "reason": form.reason })),
    )
    .await;
    if !status.is_success() {
        return error_page(status, Some(&session), &refusal(&answer));
    }
    let ended = answer
        .get("terminated_sessions")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    html(
        StatusCode::OK,
        layout(
            "Terminated",
            Some(&session),
            &format!(
                "<p class=\"good\">{ended} session(s) ended.</p><p><a href=\"/zones/{}/sessions\">Back to the sessions</a></p>",
                escape(zone_id)
            ),
        ),
    )
}

/// The documents of a set version's manifest, in manifest order, each headed by its policy
/// version id: what a diff compares.
async fn documents_of(
    state: &RoleState,
    session: &Session,
    zone_id: &str,
    manifest: &Value,
) -> String {
    let wanted: Vec<&str> = manifest
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter_map(|entry| entry.get("policy_version_id").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let (_, policies) = admin(
        state,
        session,
        "GET",
        &format!("/v1/zones/{zone_id}/policies?limit=500"),
        None,
    )
    .await;
    let mut contents: HashMap<String, String> = HashMap::new();
    for policy in policies
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let id = text_of(policy, "id");
        if !caracal_core::is_plain_id(id) {
            continue;
        }
        let (_, full) = admin(
            state,
            session,
            "GET",
            &format!("/v1/zones/{zone_id}/policies/{id}"),
            None,
        )
        .await;
        for version in full
            .get("versions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            contents.insert(
                text_of(version, "id").to_owned(),
                text_of(version, "content").to_owned(),
            );
        }
    }
    wanted
        .iter()
        .map(|id| {
            format!(
                "# policy version {id}\n{}",
                contents.get(*id).map_or("(not found)", String::as_str)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A line diff (longest common subsequence): unchanged lines with two spaces, removed with
/// `- `, added with `+ `.
pub fn line_diff(before: &str, after: &str) -> Vec<(char, String)> {
    let (a, b): (Vec<&str>, Vec<&str>) = (before.lines().collect(), after.lines().collect());
    // Documents are small (a data document is at most 64 KiB); the table is bounded by that.
    let mut lengths = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            let value = if a.get(i) == b.get(j) {
                lengths
                    .get(i + 1)
                    .and_then(|row| row.get(j + 1))
                    .copied()
                    .unwrap_or(0)
                    + 1
            } else {
                let down = lengths
                    .get(i + 1)
                    .and_then(|row| row.get(j))
                    .copied()
                    .unwrap_or(0);
                let right = lengths
                    .get(i)
                    .and_then(|row| row.get(j + 1))
                    .copied()
                    .unwrap_or(0);
                down.max(right)
            };
            if let Some(cell) = lengths.get_mut(i).and_then(|row| row.get_mut(j)) {
                *cell = value;
            }
        }
    }
    let at = |i: usize, j: usize| {
        lengths
            .get(i)
            .and_then(|row| row.get(j))
            .copied()
            .unwrap_or(0)
    };
    let (mut i, mut j, mut lines) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(left), Some(right)) if left == right => {
                lines.push((' ', (*left).to_owned()));
                i += 1;
                j += 1;
            }
            (Some(left), Some(_)) if at(i + 1, j) >= at(i, j + 1) => {
                lines.push(('-', (*left).to_owned()));
                i += 1;
            }
            (Some(left), None) => {
                lines.push(('-', (*left).to_owned()));
                i += 1;
            }
            (_, Some(right)) => {
                lines.push(('+', (*right).to_owned()));
                j += 1;
            }
            (None, None) => break,
        }
    }
    lines
}

#[derive(Deserialize, Default)]
struct SetQuery {
    from: Option<String>,
    to: Option<String>,
}

async fn policy_set_page(
    State(state): State<RoleState>,
    headers: HeaderMap,
    axum::extract::Path((zone_id, set_id)): axum::extract::Path<(String, String)>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let query: SetQuery =
        serde_urlencoded::from_str(raw.as_deref().unwrap_or_default()).unwrap_or_default();
    policy_set_view(&state, &session, &zone_id, &set_id, &query, None).await
}

async fn policy_set_view(
    state: &RoleState,
    session: &Session,
    zone_id: &str,
    set_id: &str,
    query: &SetQuery,
    notice: Option<String>,
) -> Response {
    let (Some(zone_id), true) = (zone_path(zone_id), caracal_core::is_plain_id(set_id)) else {
        return error_page(StatusCode::NOT_FOUND, Some(session), "no such policy set");
    };
    let base = format!("/v1/zones/{zone_id}/policy-sets/{set_id}");
    let (status, set) = admin(state, session, "GET", &base, None).await;
    if !status.is_success() {
        return error_page(status, Some(session), &refusal(&set));
    }
    let (_, versions) = admin(
        state,
        session,
        "GET",
        &format!("{base}/versions?limit=500"),
        None,
    )
    .await;
    let versions = versions
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (active, good) = (
        text_of(&set, "active_version_id"),
        text_of(&set, "last_known_good_version_id"),
    );
    let mut body = notice.unwrap_or_default();
    body.push_str("<section class=\"card\"><h2>Versions</h2><table><tr><th>Version</th><th>Id</th><th>Manifest SHA-256</th><th>Canaries</th><th>State</th><th></th></tr>");
    for version in &versions {
        let id = text_of(version, "id");
        let state_label = match (id == active, id == good) {
            (true, _) => "active",
            (false, true) => "last known good",
            _ => "",
        };
        let canaries = version
            .get("canaries")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let activate = if session.writer && id != active {
            format!(
                "<form method=\"post\" class=\"action\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <input type=\"hidden\" name=\"action\" value=\"activate\"><input type=\"hidden\" name=\"version_id\" value=\"{}\">\
                 <button>Activate</button></form>",
                escape(&session.csrf),
                escape(id)
            )
        } else {
            String::new()
        };
        body.push_str(&format!(
            "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{canaries}</td><td>{}</td><td>{activate}</td></tr>",
            escape(&version.get("version").map_or_else(String::new, Value::to_string)),
            escape(id),
            escape(text_of(version, "manifest_sha256")),
            escape(state_label)
        ));
    }
    body.push_str("</table></section>");

    // Diff between two versions.
    let options = |selected: Option<&str>| {
        versions
            .iter()
            .map(|version| {
                let id = text_of(version, "id");
                format!(
                    "<option value=\"{}\"{}>{}</option>",
                    escape(id),
                    if selected == Some(id) {
                        " selected"
                    } else {
                        ""
                    },
                    escape(
                        &version
                            .get("version")
                            .map_or_else(String::new, Value::to_string)
                    )
                )
            })
            .collect::<String>()
    };
    body.push_str(&format!(
        "<section class=\"card\"><h2>Diff</h2><form method=\"get\"><label>From <select name=\"from\">{}</select></label> \
         <label>To <select name=\"to\">{}</select></label> <button>Compare</button></form>",
        options(query.from.as_deref()),
        options(query.to.as_deref())
    ));
    let manifest_of = |id: &str| {
        versions
            .iter()
            .find(|version| text_of(version, "id") == id)
            .and_then(|version| version.get("manifest").cloned())
    };
    if let (Some(from), Some(to)) = (
        query.from.as_deref().and_then(manifest_of),
        query.to.as_deref().and_then(manifest_of),
    ) {
        let before = documents_of(state, session, zone_id, &from).await;
        let after = documents_of(state, session, zone_id, &to).await;
        body.push_str("<pre class=\"diff\">");
        for (mark, line) in line_diff(&before, &after) {
            let class = match mark {
                '+' => "added",
                '-' => "removed",
                _ => "same",
            };
            body.push_str(&format!(
                "<span class=\"{class}\">{mark} {}</span>\n",
                escape(&line)
            ));
        }
        body.push_str("</pre>");
    }
    body.push_str("</section>");

    // Simulate a request against a version.
    body.push_str(&format!(
        "<form method=\"post\" class=\"card\"><h2>Simulate</h2>\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"action\" value=\"simulate\">\
         <p><label>Version <select name=\"version_id\">{}</select></label> \
         <label>Flow <select name=\"flow\"><option>mint</option><option>bootstrap</option><option>use</option></select></label></p>\
         <p><label>Application <input type=\"text\" name=\"application_id\"></label> \
         <label>Resource <input type=\"text\" name=\"resource\"></label></p>\
         <p><label>Scopes <input type=\"text\" name=\"scopes\"></label> \
         <label>Labels <input type=\"text\" name=\"labels\"></label> \
         <label>Edge scopes <input type=\"text\" name=\"edge_scopes\"></label></p>\
         <p><button>Simulate</button></p></form>",
        escape(&session.csrf),
        options(Some(active))
    ));
    html(
        StatusCode::OK,
        layout(
            &format!("Policy set {}", text_of(&set, "name")),
            Some(session),
            &body,
        ),
    )
}

#[derive(Deserialize)]
struct SetAction {
    csrf: String,
    action: String,
    version_id: String,
    #[serde(default)]
    flow: Option<String>,
    #[serde(default)]
    application_id: Option<String>,
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    scopes: Option<String>,
    #[serde(default)]
    labels: Option<String>,
    #[serde(default)]
    edge_scopes: Option<String>,
}

fn words(text: Option<&str>) -> Vec<String> {
    text.unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

async fn policy_set_action(
    State(state): State<RoleState>,
    headers: HeaderMap,
    axum::extract::Path((zone_id, set_id)): axum::extract::Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let form = serde_urlencoded::from_bytes::<SetAction>(&body).ok();
    let Some(form) = form.filter(|form| same(&form.csrf, &session.csrf)) else {
        return error_page(StatusCode::FORBIDDEN, Some(&session), "missing CSRF token");
    };
    let (Some(zone), true) = (zone_path(&zone_id), caracal_core::is_plain_id(&set_id)) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such policy set");
    };
    let base = format!("/v1/zones/{zone}/policy-sets/{set_id}");
    let notice = match form.action.as_str() {
        "activate" => {
            let (status, answer) = admin(
                &state,
                &session,
                "POST",
                &format!("{base}/activate"),
                Some(serde_json::json!({ "version_id": form.version_id })),
            )
            .await;
            if !status.is_success() {
                return error_page(status, Some(&session), &refusal(&answer));
            }
            format!(
                "<p class=\"good\">Activation of {} accepted; the STS loads it next.</p>",
                escape(&form.version_id)
            )
        }
        "simulate" => {
            let input = serde_json::json!({
                "flow": form.flow.as_deref().unwrap_or("mint"),
                "application_id": form.application_id.as_deref().unwrap_or_default(),
                "resource": form.resource.as_deref().unwrap_or_default(),
                "scopes": words(form.scopes.as_deref()),
                "labels": words(form.labels.as_deref()),
                "edge_scopes": words(form.edge_scopes.as_deref()),
                "session": true,
            });
            let (status, answer) = admin(
                &state,
                &session,
                "POST",
                &format!("{base}/simulate"),
                Some(serde_json::json!({ "version_id": form.version_id, "input": input })),
            )
            .await;
            if !status.is_success() {
                return error_page(status, Some(&session), &refusal(&answer));
            }
            let result = answer.get("result").cloned().unwrap_or(Value::Null);
            let reasons: Vec<String> = result
                .get("diagnostics")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|reason| format!("{}: {}", text_of(reason, "code"), text_of(reason, "detail")))
                .collect();
            let determining: Vec<&str> = result
                .get("determining_policies")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|policy| text_of(policy, "policy"))
                .collect();
            format!(
                "<section class=\"card simulation\"><h2>Simulation</h2><p>Decision: <strong class=\"decision\">{}</strong></p>\
                 <p>Reasons: {}</p><p>Determining policies: {}</p></section>",
                escape(text_of(&result, "decision")),
                escape(&reasons.join("; ")),
                escape(&determining.join(", "))
            )
        }
        _ => return error_page(StatusCode::BAD_REQUEST, Some(&session), "unknown action"),
    };
    policy_set_view(
        &state,
        &session,
        zone,
        &set_id,
        &SetQuery::default(),
        Some(notice),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::{escape, line_diff};

    #[test]
    fn escaping_leaves_no_markup_and_the_diff_marks_each_line() {
        assert_eq!(
            escape(r#"<a href="x" onclick='y'>&</a>"#),
            "&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;&lt;/a&gt;"
        );
        let diff = line_diff("a\nb\nc\n", "a\nc\nd\n");
        let marks: Vec<String> = diff
            .iter()
            .map(|(mark, line)| format!("{mark}{line}"))
            .collect();
        assert_eq!(marks, [" a", "-b", " c", "+d"]);
        assert!(line_diff("", "").is_empty());
        assert_eq!(line_diff("x", "").len(), 1);
    }
}

#[derive(Deserialize, Default)]
struct ExplainQuery {
    request_id: Option<String>,
}

/// One request's events and each deny rebuilt (policy input, decision, reasons), from
/// `…/audit/by-request/{id}/explain`. `/zones/{zone}/audit/explain?request_id=` is the form's.
async fn explain(
    State(state): State<RoleState>,
    headers: HeaderMap,
    axum::extract::Path((zone_id, request_id)): axum::extract::Path<(String, String)>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let request_id = if request_id == "explain" {
        serde_urlencoded::from_str::<ExplainQuery>(raw.as_deref().unwrap_or_default())
            .unwrap_or_default()
            .request_id
            .unwrap_or_default()
    } else {
        request_id
    };
    let (Some(zone_id), true) = (zone_path(&zone_id), caracal_core::is_plain_id(&request_id))
    else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such request");
    };
    let (status, answer) = admin(
        &state,
        &session,
        "GET",
        &format!("/v1/zones/{zone_id}/audit/by-request/{request_id}/explain"),
        None,
    )
    .await;
    if !status.is_success() {
        return error_page(status, Some(&session), &refusal(&answer));
    }
    let mut body = format!(
        "<section class=\"card\"><p>Final decision: <strong class=\"decision\">{}</strong></p></section>",
        escape(text_of(&answer, "final_decision"))
    );
    body.push_str(&format!(
        "<section class=\"card\"><h2>Events</h2>{}</section>",
        table(
            &serde_json::json!({ "items": answer.get("events").cloned().unwrap_or(Value::Null) }),
            &[
                ("Event", "/event_type"),
                ("Decision", "/decision"),
                ("Policy set version", "/policy_set_version_id"),
                ("Diagnostics", "/diagnostics_json")
            ],
        )
    ));
    for denied in answer
        .get("denied")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let pretty = |pointer: &str| {
            denied
                .pointer(pointer)
                .map(|value| serde_json::to_string_pretty(value).unwrap_or_default())
                .unwrap_or_default()
        };
        body.push_str(&format!(
            "<section class=\"card\"><h2>Deny {}</h2><p>Rebuilt under version <code>{}</code>; matches the record: {}</p>\
             <h3>Policy input</h3><pre>{}</pre><h3>Decision</h3><pre>{}</pre></section>",
            escape(text_of(denied, "event_id")),
            escape(text_of(denied, "policy_set_version_id")),
            escape(&pretty("/matches_record")),
            escape(&pretty("/policy_input")),
            escape(&pretty("/rebuilt"))
        ));
    }
    html(
        StatusCode::OK,
        layout("Explain a request", Some(&session), &body),
    )
}

#[derive(Deserialize, Default)]
struct TimelineQuery {
    session: Option<String>,
    request: Option<String>,
}

/// A zone's events oldest first (the newest 500), optionally of one session or one request:
/// `caracal incident timeline` in the browser.
async fn timeline(
    State(state): State<RoleState>,
    headers: HeaderMap,
    axum::extract::Path(zone_id): axum::extract::Path<String>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    let Some((_, session)) = session(&state, &headers).await else {
        return redirect("/sign-in");
    };
    let Some(zone_id) = zone_path(&zone_id) else {
        return error_page(StatusCode::NOT_FOUND, Some(&session), "no such zone");
    };
    let filter: TimelineQuery =
        serde_urlencoded::from_str(raw.as_deref().unwrap_or_default()).unwrap_or_default();
    let plain = |value: Option<String>| value.filter(|id| caracal_core::is_plain_id(id));
    let (by_session, by_request) = (plain(filter.session), plain(filter.request));
    let mut query = vec![("limit", "500".to_owned())];
    if let Some(id) = &by_session {
        query.push(("session_id", id.clone()));
    }
    if let Some(id) = &by_request {
        query.push(("request_id", id.clone()));
    }
    let path = format!(
        "/v1/zones/{zone_id}/audit?{}",
        serde_urlencoded::to_string(&query).unwrap_or_default()
    );
    let (status, mut events) = admin(&state, &session, "GET", &path, None).await;
    if !status.is_success() {
        return error_page(status, Some(&session), &refusal(&events));
    }
    if let Some(items) = events.get_mut("items").and_then(Value::as_array_mut) {
        items.reverse();
    }
    let body = format!(
        "<section class=\"card\"><form method=\"get\"><label>Session <input type=\"text\" name=\"session\" value=\"{}\"></label> \
         <label>Request <input type=\"text\" name=\"request\" value=\"{}\"></label> <button>Show</button></form></section>{}",
        escape(by_session.as_deref().unwrap_or("")),
        escape(by_request.as_deref().unwrap_or("")),
        table(
            &events,
            &[
                ("Seq", "/chain_seq"),
                ("When (ms)", "/occurred_at_ms"),
                ("Event", "/event_type"),
                ("Decision", "/decision"),
                ("Request", "/request_id"),
                ("Actor", "/metadata_json/actor")
            ],
        )
    );
    html(StatusCode::OK, layout("Timeline", Some(&session), &body))
}
