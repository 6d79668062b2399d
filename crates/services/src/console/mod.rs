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
use caracal_store::now_ms;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::Value;
use tower::ServiceExt as _;

use crate::state::RoleState;

mod health;
mod incident;
mod policy;
mod sessions;
mod zones;

use incident::*;
use policy::*;
use sessions::*;
use zones::*;

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

/// Signed-in sessions of this process, by cookie value; whether cookies carry `Secure`; and
/// the admin API's routes the console calls, built once.
#[derive(Clone, Default)]
pub struct Sessions(
    Arc<Mutex<HashMap<String, Session>>>,
    bool,
    Arc<std::sync::OnceLock<Router>>,
);

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
    /// `secure`: the console is reached over HTTPS, so its cookies carry `Secure`.
    pub fn new(secure: bool) -> Sessions {
        Sessions(Arc::default(), secure, Arc::default())
    }

    /// The attributes every console cookie carries.
    fn attributes(&self) -> &'static str {
        if self.1 {
            "HttpOnly; SameSite=Strict; Secure"
        } else {
            "HttpOnly; SameSite=Strict"
        }
    }

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
        .route(
            "/zones/{zone_id}/applications/{application_id}/revoke",
            get(revoke_preview).post(revoke),
        )
        .route("/zones/{zone_id}/audit", get(audit))
        .route("/zones/{zone_id}/audit/{request_id}", get(explain))
        .route("/zones/{zone_id}/timeline", get(timeline))
        .route("/zones/{zone_id}/audit/export", get(export))
        .route("/incident", get(incident).post(contain_or_release))
        .route(
            "/incident/validate",
            axum::routing::post(incident::validate),
        )
        .route(
            "/incident/preserve",
            axum::routing::post(incident::preserve),
        )
        .route("/incident/bundles/{name}", get(incident::bundle))
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
    let (status, bytes) = admin_bytes(state, session, method, path, body).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Calls the admin API's own route with the session's token; its answer when it succeeded,
/// else the refusal as a page.
async fn succeeded(
    state: &RoleState,
    session: &Session,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, Response> {
    let (status, answer) = admin(state, session, method, path, body).await;
    if status.is_success() {
        Ok(answer)
    } else {
        Err(error_page(status, Some(session), &refusal(&answer)))
    }
}

/// Calls the admin API's own route with the session's token; status and body as they are.
async fn admin_bytes(
    state: &RoleState,
    session: &Session,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Bytes) {
    let app = state
        .console
        .2
        // With the API's own layers: the session's token spends the same request budget as
        // over the API, and nothing is answered once the process drains.
        .get_or_init(|| crate::router::in_process_admin_api(&state.shared))
        .clone();
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {}", session.token))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            body.map(|body| body.to_string()).unwrap_or_default(),
        ));
    let Ok(request) = request else {
        return (StatusCode::BAD_REQUEST, Bytes::new());
    };
    match app.oneshot(request).await {
        Ok(response) => {
            let status = response.status();
            // An export can be large; the rest are small.
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 30)
                .await
                .unwrap_or_default();
            (status, bytes)
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

async fn sign_in_page(State(state): State<RoleState>) -> Response {
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
        "{SIGN_IN_COOKIE}={csrf}; Path=/sign-in; {}",
        state.console.attributes()
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
        "{COOKIE}={id}; Path=/; {}; Max-Age={}",
        state.console.attributes(),
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

/// A form posted by a signed-in session: the session's id, the session and the form, when the
/// form carries the session's CSRF token and parses; else the answer to send instead (to
/// sign-in, 403 without the token, 400 for a form that does not parse).
async fn posted<T: serde::de::DeserializeOwned>(
    state: &RoleState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, Session, T), Response> {
    let Some((id, session)) = session(state, headers).await else {
        return Err(redirect("/sign-in"));
    };
    let csrf = serde_urlencoded::from_bytes::<CsrfForm>(body).ok();
    if !csrf.is_some_and(|form| same(&form.csrf, &session.csrf)) {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            Some(&session),
            "missing CSRF token",
        ));
    }
    match serde_urlencoded::from_bytes::<T>(body) {
        Ok(form) => Ok((id, session, form)),
        Err(_) => Err(error_page(
            StatusCode::BAD_REQUEST,
            Some(&session),
            "the form is incomplete",
        )),
    }
}

async fn sign_out(State(state): State<RoleState>, headers: HeaderMap, body: Bytes) -> Response {
    let (id, _, CsrfForm { .. }) = match posted(&state, &headers, &body).await {
        Ok(posted) => posted,
        Err(refused) => return refused,
    };
    state.console.lock().remove(&id);
    let mut response = redirect("/sign-in");
    if let Ok(value) = HeaderValue::from_str(&format!(
        "{COOKIE}=; Path=/; {}; Max-Age=0",
        state.console.attributes()
    )) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
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
/// `GET path` of the admin API as a download: the page headers (no-store, CSP) with the file's
/// type and name, or the refusal as a page. `file_name` must be plain (the callers build it
/// from checked ids).
async fn download(
    state: &RoleState,
    session: &Session,
    path: &str,
    content_type: &'static str,
    file_name: &str,
) -> Response {
    let (status, bytes) = admin_bytes(state, session, "GET", path, None).await;
    if !status.is_success() {
        let answer = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        return error_page(status, Some(session), &refusal(&answer));
    }
    let mut response = html(StatusCode::OK, String::new());
    *response.body_mut() = Body::from(bytes);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

fn zone_path(zone_id: &str) -> Option<&str> {
    caracal_core::is_plain_id(zone_id).then_some(zone_id)
}

fn text_of<'a>(value: &'a Value, field: &str) -> &'a str {
    value.get(field).and_then(Value::as_str).unwrap_or("")
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
