//! One function builds each role's router, so the layers a request passes through are visible
//! in one place.

use axum::Router;
use axum::routing::get;
use caracal_core::{ErrorCode, Role};

use crate::error::ApiError;
use crate::state::RoleState;
use crate::{probes, request_id};

/// The API role's `/v1` routes with their layers: refused once draining, then request budgets
/// and the authentication-failure lockout; every answer is marked not to be cached or sniffed.
/// The console calls these same routes in process.
pub(crate) fn admin_api(state: &RoleState) -> Router<RoleState> {
    crate::api::routes()
        .merge(crate::admin::routes())
        .merge(crate::control::routes())
        .layer(axum::extract::DefaultBodyLimit::max(crate::admin::MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::limit_auth_failures,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            refuse_when_draining,
        ))
        .layer(axum::middleware::map_response(not_cached))
}

/// `/v1` answers carry secrets (a client secret, an admin token, a revealed workload secret):
/// no cache, proxy or browser may keep one, and none may be sniffed into something else.
async fn not_cached(mut response: axum::response::Response) -> axum::response::Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (http::header::CACHE_CONTROL, "no-store"),
        (http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (http::header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, http::HeaderValue::from_static(value));
    }
    response
}

/// The API role's `/v1` routes with their layers, to call in process (the console, control
/// invocations): the same checks, budgets and drain as over the network.
pub(crate) fn in_process_admin_api(shared: &crate::state::Shared) -> Router {
    let api = RoleState::new(Role::Api, shared.clone());
    admin_api(&api).with_state(api)
}

/// The router of one role. Layer order (outermost first):
/// 1. `request_id::layer`: first, so every response (errors and 404s included) carries the
///    request id and every log line of the request sits in its span.
/// 2. `error::json_errors`: any error the framework answers by itself (an unreadable path, a
///    body over the limit) gets the same JSON body as a handler's error.
/// 3. `run_to_end`: the request runs on a task of its own, so a caller that hangs up cannot
///    stop it halfway (a governed call between the upstream and its audit event, a terminate
///    between its event and the cascade); a handler that panics is a JSON 500.
/// 4. `body_deadline` (every role but the Gateway): a request's body must arrive within
///    [`BODY_TIMEOUT`] of its head.
/// 5. The role's routes, then JSON 404/405 for anything else. The API role's `/v1` routes add
///    their own layers: refused once draining, then request budgets and the lockout.
pub fn router(state: RoleState) -> Router {
    let probes = Router::new()
        .route("/health", get(probes::health))
        .route("/ready", get(probes::ready))
        .route("/metrics", get(probes::metrics));
    // Each role's own routes are merged here as the role lands (STS, Gateway, ...).
    let routes = match state.role {
        // `/v1`: refused once draining, then budgets and the authentication-failure lockout.
        Role::Api => probes.merge(admin_api(&state)),
        Role::Sts => probes.merge(crate::sts::routes()),
        // Admin tokens (operators) are budgeted as on `/v1`; mandates pass.
        Role::Coordinator => probes.merge(crate::coordinator::routes().layer(
            axum::middleware::from_fn_with_state(
                state.clone(),
                crate::coordinator::budget_admin_tokens,
            ),
        )),
        Role::Console => probes
            .merge(crate::console::routes().layer(axum::extract::DefaultBodyLimit::max(64 * 1024))),
        // Every other path is a governed call.
        Role::Gateway => probes
            .route(
                "/internal/revocations/reload",
                axum::routing::post(crate::gateway::reload_revocations),
            )
            .fallback(crate::gateway::proxy),
        _ => probes,
    };
    let routes = if state.role == Role::Gateway {
        routes
    } else {
        routes
            .fallback(|| async { ApiError::new(ErrorCode::NotFound) })
            .layer(axum::middleware::from_fn(body_deadline))
    };
    routes
        .method_not_allowed_fallback(|| async { ApiError::new(ErrorCode::MethodNotAllowed) })
        .layer(axum::middleware::from_fn(run_to_end))
        .layer(axum::middleware::from_fn(crate::error::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_id::layer,
        ))
        .with_state(state)
}

/// How long a request's body may take to arrive once its head has, on every role but the
/// Gateway (whose uploads stream to the upstream under its own timeouts): a client that
/// trickles a body holds a connection's place (`serve.rs`) this long at most.
pub(crate) const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Gives the request's body [`BODY_TIMEOUT`] to arrive; past it, reading the body fails and the
/// handler answers as for any unreadable body.
async fn body_deadline(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::body::HttpBody as _;
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let request = request.map(|body| {
        axum::body::Body::new(Deadline {
            body,
            expires: Box::pin(tokio::time::sleep(BODY_TIMEOUT)),
        })
    });
    next.run(request).await
}

/// A body that fails once its deadline passes before it has ended.
struct Deadline {
    body: axum::body::Body,
    expires: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl axum::body::HttpBody for Deadline {
    type Data = axum::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future as _;
        use std::task::Poll;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut self.body).poll_frame(context) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        match self.expires.as_mut().poll(context) {
            Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                "request body not received within {} s",
                BODY_TIMEOUT.as_secs()
            )
            .into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Runs the request on a task of its own: hyper drops a request's future when its caller hangs
/// up, and a request that has started changing things must finish, evidence included.
async fn run_to_end(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    use tracing::Instrument as _;
    tokio::spawn(next.run(request).in_current_span())
        .await
        .unwrap_or_else(|_| ApiError::new(ErrorCode::InternalError).into_response())
}

/// Once shutdown starts, new `/v1` work is refused with 503 `draining` (and `Retry-After`), so
/// a client moves to another replica; requests already running finish.
async fn refuse_when_draining(
    axum::extract::State(state): axum::extract::State<RoleState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if state.shared.is_draining() {
        return ApiError::new(ErrorCode::Draining).into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests;
