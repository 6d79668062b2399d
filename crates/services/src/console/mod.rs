//! The Console role (port 3001): server-rendered pages for operators, no script at all. Sign-in
//! takes an admin token; the session lives in the store, so every console replica on it serves
//! it and a restart keeps it (cookie `HttpOnly`, `SameSite=Strict`, idle and absolute expiry;
//! stored as the cookie's SHA-256 with the token sealed under the KEK), and every page
//! re-checks the token, so a revoked token signs its sessions out. Every read and change goes
//! through the admin API's own routes in process with the session's token, so the console is
//! authorised, validated and audited exactly as the API is, and a read token is refused a
//! change there even if a form is forged.
//! Forms carry a per-session CSRF token; pages carry a strict Content-Security-Policy and are
//! never framed or cached; every value is HTML-escaped. Screens: overview, zones, a zone (its
//! applications, providers, resources, policy sets, sessions and pending approvals), a zone's
//! audit with filters and the chain status, and incident containment (contain and release with
//! a reason).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caracal_core::ErrorCode;
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
/// How stale a session's last-seen time may get before a page refreshes it: idle expiry is this
/// coarse, and a page view writes to the store at most this often.
const REFRESH_MS: i64 = 60 * 1000;
const CSS: &str = include_str!("console.css");
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// Whether the console's cookies carry `Secure`, and the admin API's routes it calls, built
/// once. Signed-in sessions are in the store.
#[derive(Clone, Default)]
pub struct Console {
    secure_cookies: bool,
    admin_api: Arc<std::sync::OnceLock<Router>>,
}

/// A signed-in session, opened for one request. As an extractor it refuses a request without
/// one with the way to sign-in (a 503 page when the store cannot say): never a page without a
/// session.
struct Session {
    /// The stored id (the cookie's SHA-256).
    id: String,
    /// Held to call the admin API on the operator's behalf; never rendered.
    token: String,
    csrf: String,
    writer: bool,
}

impl Console {
    /// `secure_cookies`: the console is reached over HTTPS, so its cookies carry `Secure`.
    pub fn new(secure_cookies: bool) -> Console {
        Console {
            secure_cookies,
            admin_api: Arc::default(),
        }
    }

    /// The attributes every console cookie carries.
    fn attributes(&self) -> &'static str {
        if self.secure_cookies {
            "HttpOnly; SameSite=Strict; Secure"
        } else {
            "HttpOnly; SameSite=Strict"
        }
    }
}

fn store_unavailable() -> Response {
    error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        None,
        "the store is unavailable: try again shortly",
    )
}

/// How a session is stored: its cookie's SHA-256, so the store never holds a usable cookie.
fn stored_id(cookie: &str) -> String {
    caracal_crypto::hex(&caracal_crypto::sha256(cookie.as_bytes()))
}

/// What a session's token is sealed for: that session alone.
fn token_purpose(stored_id: &str) -> String {
    format!("console-session:{stored_id}")
}

/// Whether the caller may change what its token covers.
fn writer(caller: &crate::auth::AdminCaller) -> bool {
    caller
        .require(
            crate::auth::Access::Write,
            match &caller.scope {
                caracal_store::TokenScope::Global => None,
                caracal_store::TokenScope::Zone(zone) => Some(zone.as_str()),
            },
        )
        .is_ok()
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
        .route(
            "/incident/tamper",
            axum::routing::post(incident::acknowledge_tamper),
        )
        .route(
            "/incident/dlq",
            axum::routing::post(incident::replay_dead_letters),
        )
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

impl FromRequestParts<RoleState> for Session {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &RoleState,
    ) -> Result<Session, Response> {
        session(state, &parts.headers).await
    }
}

/// The signed-in session of the request, refreshed. Absent, expired, or with a token no longer
/// valid, the answer is the way to the sign-in form; the store unreachable is a 503 page.
async fn session(state: &RoleState, headers: &HeaderMap) -> Result<Session, Response> {
    let Some(cookie) = cookie(headers, COOKIE) else {
        return Err(redirect("/sign-in"));
    };
    let id = stored_id(&cookie);
    let store = &state.shared.store;
    let stored = match store.console_session(&id).await {
        Ok(Some(stored)) => stored,
        Ok(None) => return Err(redirect("/sign-in")),
        Err(error) => {
            tracing::warn!(%error, "console session lookup");
            return Err(store_unavailable());
        }
    };
    // Expired, unreadable or revoked: ended here for every replica.
    let ended = || async {
        if let Err(error) = store.end_console_session(&id).await {
            tracing::warn!(%error, "ending a console session");
        }
        redirect("/sign-in")
    };
    let now = now_ms();
    let live = now - stored.seen_at_ms < IDLE_MS && now - stored.created_at_ms < ABSOLUTE_MS;
    let token = live
        .then(|| {
            state
                .shared
                .kek
                .open(&token_purpose(&id), &stored.token_envelope)
        })
        .and_then(Result::ok)
        .and_then(|opened| String::from_utf8(opened).ok());
    let Some((token, parsed)) = token.and_then(|token| {
        let parsed = caracal_crypto::AdminToken::parse(&token)?;
        Some((token, parsed))
    }) else {
        return Err(ended().await);
    };
    let caller = match crate::auth::caller_of(state, &parsed.digest()).await {
        Ok(caller) => caller,
        Err(error) if error.code == ErrorCode::InvalidAdminToken => {
            return Err(ended().await);
        }
        Err(_) => return Err(store_unavailable()),
    };
    if now - stored.seen_at_ms >= REFRESH_MS
        && let Err(error) = store.touch_console_session(&id, now).await
    {
        tracing::warn!(%error, "refreshing a console session");
    }
    Ok(Session {
        id,
        token,
        csrf: stored.csrf,
        writer: writer(&caller),
    })
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
        .admin_api
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

async fn index(_: Session) -> Response {
    redirect("/overview")
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
        Some(parsed) => crate::auth::caller_of(&state, &parsed.digest()).await,
        None => Err(crate::error::ApiError::new(ErrorCode::InvalidAdminToken)),
    };
    match caller {
        Ok(_) => {}
        Err(error) if error.code == ErrorCode::InvalidAdminToken => {
            return error_page(
                StatusCode::UNAUTHORIZED,
                None,
                "that admin token, or that email and password, is not valid",
            );
        }
        Err(_) => return store_unavailable(),
    }
    let (Some(cookie), Some(csrf)) = (random_token(), random_token()) else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, None, "no randomness");
    };
    let id = stored_id(&cookie);
    let Ok(token_envelope) = state.shared.kek.seal(&token_purpose(&id), token.as_bytes()) else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, None, "no randomness");
    };
    let now = now_ms();
    let stored = caracal_store::ConsoleSession {
        id_sha256: id,
        token_envelope,
        csrf,
        created_at_ms: now,
        seen_at_ms: now,
    };
    let started = state
        .shared
        .store
        .start_console_session(&stored, now - IDLE_MS, now - ABSOLUTE_MS)
        .await;
    if let Err(error) = started {
        tracing::warn!(%error, "starting a console session");
        return store_unavailable();
    }
    let mut response = redirect("/overview");
    if let Ok(value) = HeaderValue::from_str(&format!(
        "{COOKIE}={cookie}; Path=/; {}; Max-Age={}",
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

/// A form posted by a signed-in session, carrying the session's CSRF token. As an extractor it
/// refuses the request with the way to sign-in, 403 without the token, or 400 for a form that
/// does not parse.
struct Posted<T>(Session, T);

impl<T: serde::de::DeserializeOwned> FromRequest<RoleState> for Posted<T> {
    type Rejection = Response;

    async fn from_request(
        request: http::Request<Body>,
        state: &RoleState,
    ) -> Result<Posted<T>, Response> {
        let (parts, body) = request.into_parts();
        let session = session(state, &parts.headers).await?;
        let body = Bytes::from_request(http::Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        let csrf = serde_urlencoded::from_bytes::<CsrfForm>(&body).ok();
        if !csrf.is_some_and(|form| same(&form.csrf, &session.csrf)) {
            return Err(error_page(
                StatusCode::FORBIDDEN,
                Some(&session),
                "missing CSRF token",
            ));
        }
        match serde_urlencoded::from_bytes::<T>(&body) {
            Ok(form) => Ok(Posted(session, form)),
            Err(_) => Err(error_page(
                StatusCode::BAD_REQUEST,
                Some(&session),
                "the form is incomplete",
            )),
        }
    }
}

async fn sign_out(
    State(state): State<RoleState>,
    Posted(session, CsrfForm { .. }): Posted<CsrfForm>,
) -> Response {
    if let Err(error) = state.shared.store.end_console_session(&session.id).await {
        tracing::warn!(%error, "ending a console session");
        return error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "the store is unavailable, so the session is not ended: try again shortly",
        );
    }
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
    use std::sync::atomic::Ordering;

    use axum::body::Body;
    use caracal_core::Role;
    use caracal_store::TokenScope;
    use caracal_store::db::{Db as _, Value};
    use http::{Request, StatusCode};
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::{escape, line_diff, stored_id};
    use crate::router::router;
    use crate::state::RoleState;
    use crate::test_support::{switchable_shared, token};

    /// Status, `location`, `set-cookie` (its `name=value`) and body of one console request.
    async fn send(
        console: &axum::Router,
        method: &str,
        path: &str,
        cookie: &str,
        form: &str,
    ) -> (StatusCode, String, String, String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("cookie", cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(form.to_owned()))
            .unwrap();
        let response = console.clone().oneshot(request).await.unwrap();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .to_owned()
        };
        let (location, set_cookie) = (header("location"), header("set-cookie"));
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            location,
            set_cookie,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    fn csrf_of(page: &str) -> String {
        let at = page.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
        page[at..].split('"').next().unwrap().to_owned()
    }

    async fn sign_in(console: &axum::Router, token: &str) -> String {
        let (_, _, form_cookie, page) = send(console, "GET", "/sign-in", "", "").await;
        let form = format!("token={token}&csrf={}", csrf_of(&page));
        let (status, location, cookie, page) =
            send(console, "POST", "/sign-in", &form_cookie, &form).await;
        assert_eq!(
            (status, location.as_str()),
            (StatusCode::SEE_OTHER, "/overview"),
            "{page}"
        );
        cookie
    }

    #[tokio::test]
    async fn a_session_is_the_stores_shared_by_replicas_and_ended_for_all() {
        let (_keep, store, shared) = switchable_shared();
        let first = router(RoleState::new(Role::Console, shared.clone()));
        let second = router(RoleState::new(Role::Console, shared.clone()));
        let reader = token(&shared, "read", TokenScope::Global).await;

        let cookie = sign_in(&first, &reader).await;
        for replica in [&first, &second] {
            let (status, location, _, _) = send(replica, "GET", "/", &cookie, "").await;
            assert_eq!(
                (status, location.as_str()),
                (StatusCode::SEE_OTHER, "/overview")
            );
        }
        // The store holds neither the cookie nor the token in the clear.
        let value = cookie.split_once('=').unwrap().1;
        let stored = shared
            .store
            .console_session(&stored_id(value))
            .await
            .unwrap()
            .unwrap();
        assert!(!stored.token_envelope.contains(&reader));
        assert_ne!(stored.id_sha256, value);

        // The store down: a 503 page, never a signed-in page.
        store.down.store(true, Ordering::SeqCst);
        let (status, _, _, page) = send(&second, "GET", "/", &cookie, "").await;
        store.down.store(false, Ordering::SeqCst);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{page}");
        assert!(page.contains("store is unavailable"), "{page}");

        // Signing out at one replica ends the session at the other.
        let (_, _, _, page) = send(&second, "GET", "/zones", &cookie, "").await;
        let form = format!("csrf={}", csrf_of(&page));
        let (status, location, _, _) = send(&second, "POST", "/sign-out", &cookie, &form).await;
        assert_eq!(
            (status, location.as_str()),
            (StatusCode::SEE_OTHER, "/sign-in")
        );
        let (status, location, _, _) = send(&first, "GET", "/", &cookie, "").await;
        assert_eq!(
            (status, location.as_str()),
            (StatusCode::SEE_OTHER, "/sign-in")
        );

        // Idle too long: ended, and its row gone.
        let cookie = sign_in(&first, &reader).await;
        let id = stored_id(cookie.split_once('=').unwrap().1);
        store
            .inner
            .change(
                "UPDATE console_sessions SET seen_at_ms = seen_at_ms - $1",
                vec![Value::Int(super::IDLE_MS)],
            )
            .await
            .unwrap();
        let (_, location, _, _) = send(&second, "GET", "/", &cookie, "").await;
        assert_eq!(location, "/sign-in");
        assert_eq!(shared.store.console_session(&id).await.unwrap(), None);

        // A row whose envelope was sealed for another session does not open.
        let one = sign_in(&first, &reader).await;
        let other = sign_in(&first, &reader).await;
        let envelope = |cookie: &str| stored_id(cookie.split_once('=').unwrap().1);
        let moved = shared
            .store
            .console_session(&envelope(&other))
            .await
            .unwrap()
            .unwrap()
            .token_envelope;
        store
            .inner
            .change(
                "UPDATE console_sessions SET token_envelope = $1 WHERE id_sha256 = $2",
                vec![
                    Value::from(moved.as_str()),
                    Value::from(envelope(&one).as_str()),
                ],
            )
            .await
            .unwrap();
        let (_, location, _, _) = send(&first, "GET", "/", &one, "").await;
        assert_eq!(location, "/sign-in");
        let (_, location, _, _) = send(&first, "GET", "/", &other, "").await;
        assert_eq!(location, "/overview");
    }

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
