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
}

impl ApiError {
    pub fn new(code: ErrorCode) -> ApiError {
        ApiError {
            code,
            description: None,
        }
    }

    pub fn with_description(code: ErrorCode, description: impl Into<String>) -> ApiError {
        ApiError {
            code,
            description: Some(description.into()),
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
