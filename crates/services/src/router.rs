//! One function builds each role's router, so the layers a request passes through are visible
//! in one place.

use axum::Router;
use axum::routing::get;
use caracal_core::{ErrorCode, Role};

use crate::error::ApiError;
use crate::state::RoleState;
use crate::{probes, request_id};

/// The router of one role. Layer order (outermost first):
/// 1. `request_id::layer`: first, so every response (errors and 404s included) carries the
///    request id and every log line of the request sits in its span.
/// 2. `error::json_errors`: any error the framework answers by itself (an unreadable path, a
///    body over the limit) gets the same JSON body as a handler's error.
/// 3. The role's routes, then JSON 404/405 for anything else.
pub fn router(state: RoleState) -> Router {
    let probes = Router::new()
        .route("/health", get(probes::health))
        .route("/ready", get(probes::ready))
        .route("/metrics", get(probes::metrics));
    // Each role's own routes are merged here as the role lands (STS, Gateway, ...).
    let routes = match state.role {
        Role::Api => probes.merge(crate::api::routes().merge(crate::admin::routes()).layer(
            axum::middleware::from_fn_with_state(state.clone(), crate::auth::limit_auth_failures),
        )),
        _ => probes,
    };
    routes
        .fallback(|| async { ApiError::new(ErrorCode::NotFound) })
        .method_not_allowed_fallback(|| async { ApiError::new(ErrorCode::MethodNotAllowed) })
        .layer(axum::middleware::from_fn(crate::error::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_id::layer,
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests;
