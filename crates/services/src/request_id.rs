//! The outermost layer of every role: request id, access metrics and the request's log span.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use caracal_core::RequestId;
use http::HeaderValue;
use tracing::Instrument as _;

use crate::metrics::{RequestLabels, RouteLabels, method_label};
use crate::state::RoleState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Keeps a well-formed inbound `X-Request-Id`, else generates a UUIDv7; puts it in the request
/// extensions and in a span that every log line of the request inherits; echoes it on the
/// response; and counts the request by route template.
pub async fn layer(State(state): State<RoleState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|value| RequestId::from_inbound(value.as_bytes()))
        .unwrap_or_else(|| RequestId::generated(uuid::Uuid::now_v7().to_string()));
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(request.method());
    request.extensions_mut().insert(request_id.clone());

    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        role = %state.role,
        method = %request.method(),
        route = %route,
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    span.in_scope(|| tracing::debug!(status = response.status().as_u16(), "answered"));

    if let Ok(value) = HeaderValue::from_str(request_id.as_str()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    state
        .metrics
        .http_request_duration
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    state
        .metrics
        .http_requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: u32::from(response.status().as_u16()),
        })
        .inc();
    response
}
