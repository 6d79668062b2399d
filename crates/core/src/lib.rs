//! Domain types and pure decision logic shared by every role.
//!
//! Nothing here does IO, spawns tasks or reads the clock: callers pass time and state in and get
//! a value back, so every safety rule can be tested as a plain function. The main types are
//! [`Role`] (the six processes the `caracal` binary can run), [`ErrorCode`] (the stable wire
//! codes every client-facing error maps to), [`RequestId`] (the correlation id carried by every
//! request and log line) and [`Readiness`] (the result of a role's readiness checks).

mod error_code;
mod readiness;
mod request_id;
mod role;

pub use error_code::ErrorCode;
pub use readiness::{Check, Readiness};
pub use request_id::RequestId;
pub use role::{Role, UnknownRoleError};

/// An id as the SDK sends it in paths and mandate claims: 1 to 128 of `A-Za-z0-9._:-`.
pub fn is_plain_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-' | b':'))
}
