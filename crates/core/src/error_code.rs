//! Stable error codes: the `error` field of every JSON error body, with its HTTP status.
//!
//! A code is part of the wire contract: once shipped it never changes meaning or spelling.
//! Metrics label fail-closed denials with the same string.

/// Every error a client can see. Add variants; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is malformed: bad syntax, bad field, bad header.
    InvalidRequest,
    /// No such route or object (also used for objects of another zone).
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// The body exceeds the route's limit.
    PayloadTooLarge,
    /// The process is shutting down and refuses new protected work.
    Draining,
    /// A dependency or safety check failed; the role refuses protected work (fail closed).
    NotReady,
    /// The system of record cannot be reached (invariant 1: store down denies).
    StoreUnavailable,
    /// Anything unexpected. The client sees only this code; details go to the log once.
    InternalError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Draining => "draining",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::InternalError => "internal_error",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::Draining | ErrorCode::NotReady | ErrorCode::StoreUnavailable => 503,
            ErrorCode::InternalError => 500,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_and_statuses_are_errors() {
        let all = [
            ErrorCode::InvalidRequest,
            ErrorCode::NotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::PayloadTooLarge,
            ErrorCode::Draining,
            ErrorCode::NotReady,
            ErrorCode::StoreUnavailable,
            ErrorCode::InternalError,
        ];
        for code in all {
            let text = code.as_str();
            assert!(
                text.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{text}"
            );
            assert!((400..600).contains(&code.http_status()), "{text}");
        }
    }
}
