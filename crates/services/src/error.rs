//! The one error type every handler returns, and its single mapping to a response.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use caracal_core::ErrorCode;

use crate::wire::ErrorBody;

/// A client-facing error: a stable code and an optional lower-case description.
/// Internal details never go into the description; log them where they happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub description: Option<String>,
    /// Structured detail for the caller (which fields failed, which cases disagreed).
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(code: ErrorCode) -> ApiError {
        ApiError {
            code,
            description: None,
            details: None,
        }
    }

    pub fn with_description(code: ErrorCode, description: impl Into<String>) -> ApiError {
        ApiError {
            code,
            description: Some(description.into()),
            details: None,
        }
    }

    pub fn with_details(mut self, details: serde_json::Value) -> ApiError {
        self.details = Some(details);
        self
    }
}

/// A store failure as the caller sees it: unavailable is 503 (the request may be retried), any
/// other failure is an internal error whose detail goes to the log, not to the caller.
impl From<caracal_store::StoreError> for ApiError {
    fn from(error: caracal_store::StoreError) -> ApiError {
        match error {
            caracal_store::StoreError::Unavailable(_) => ApiError::new(ErrorCode::StoreUnavailable),
            // Gone between the check and the write (archived meanwhile): as if never there.
            caracal_store::StoreError::NotFound(_) => ApiError::new(ErrorCode::NotFound),
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::new(ErrorCode::InternalError)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error: self.code.as_str().to_owned(),
            error_description: self.description,
            details: self.details,
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        match self.code {
            ErrorCode::InvalidAdminToken => {
                headers.insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
            }
            // Back-pressure: the caller should come back shortly, not hammer.
            ErrorCode::AuditOverloaded | ErrorCode::Draining => {
                headers.insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static("1"),
                );
            }
            _ => {}
        }
        response
    }
}

/// Gives every error response the documented JSON body (the console's pages aside). Handlers
/// return [`ApiError`] already;
/// this catches what the framework answers by itself before a handler runs (a path segment
/// that is not UTF-8, a body over the limit, ...), which would otherwise be plain text.
pub async fn json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    // JSON bodies are ours already, and so are the console's HTML pages.
    let ours = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| {
            value.as_bytes().starts_with(b"application/json")
                || value.as_bytes().starts_with(b"text/html")
        });
    if ours || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let code = match status {
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        status if status.is_client_error() => ErrorCode::InvalidRequest,
        _ => ErrorCode::InternalError,
    };
    ApiError::new(code).into_response()
}
